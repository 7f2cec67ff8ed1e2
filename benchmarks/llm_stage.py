"""The LLM stage in process (``python -m mofserve.benchmarks.llm_stage``, ``make bench-llm``): what
the in-flight batching engine buys, what a deeper LM would cost, and how it compares with
transformers' own engines, on one profile's LM (default ``paper-shaped``: 7B-wide, 2 layers, bf16).

Sections (``--sections``; all by default):

* ``engines``: ``--sequences`` requests of ~``--prompt-tokens`` positions (random visual tokens of
  the embeddings' scale + a question), ``--new-tokens`` greedy tokens each, run four ways on the same
  weights: ``LLMEngine`` with every sequence submitted at once (``max_sequences`` = sequences), the
  same engine one sequence at a time (``max_sequences`` 1, each submitted when the previous ended),
  transformers ``generate`` one at a time (``inputs_embeds``), and transformers' continuous batching
  (``ContinuousBatchingManager``, paged attention: it takes token ids only, so it gets random ids of
  the same prompt length). Per way: time to first token p50 / max (from each request's submission;
  submitted together, a request waits for the prefills before it), output tokens/s (all tokens / wall
  time), decode tokens/s (``stats.decode_figures``: tokens after the first over the time any sequence
  was decoding) and, for ``LLMEngine``, the decode step's time per batch size.
* ``layers``: prefill of one prompt and one decode step at batch 1 and ``--sequences`` with the LM
  cut or repeated to 1, 2 and 4 layers (repeating a layer object costs what a distinct layer costs:
  its weights are read again), a least-squares line ``t = fixed + layers x per_layer`` and its value
  at ``--extrapolate-layers`` (32: LLaMA-7B): an **extrapolation**, not a measurement.
* ``agreement``: greedy answers of ``--sequences`` mixed requests (visual tokens of each fusion
  mode's count, several questions, options on half, token limits 8-32) batched vs one at a time (and
  vs ``VisualLanguageModel.answer``, i.e. ``generate``): the share of answers whose tokens are
  identical and where the first differing token is.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np

from mofserve.core.profiles import get_profile

from .stats import decode_figures, latency_summary

DEFAULT_SEQUENCES = 8
DEFAULT_PROMPT_TOKENS = 640  # A-MoF: 576 visual tokens + the llava_v1 prompt (FACTS.md)
DEFAULT_NEW_TOKENS = 32
DEFAULT_DEPTHS = (1, 2, 4)
SECTIONS = ("engines", "joining", "layers", "agreement")  # joining: benchmarks/llm_joining.py
QUESTIONS = ("Is the dog facing left or right?", "What color is the car?", "Describe the image in detail.",
             "How many people are in the picture?", "Is the door open or closed?", "Where is the cup?",
             "What is the man holding in his hand?", "Is the light on?")
OPTIONS = ("(a) Left (b) Right", "(a) Red (b) Blue", None, "(a) One (b) Two", "(a) Open (b) Closed", None,
           "(a) A phone (b) A cup", None)


def log(message: str) -> None:
    print(f"[llm] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Requests


def synthetic_requests(vlm, count: int, prompt_tokens: int, new_tokens: int, seed: int = 0,
                       mixed: bool = False, visual_counts: Sequence[int] = ()) -> list[dict]:
    """Requests for ``LLMEngine.submit``: random visual tokens at the scale of the LM's input
    embeddings (random weights: no projector output to imitate) around a question, sized so that the
    prompt has ``prompt_tokens`` positions; ``mixed``: questions, options, visual token counts
    (``visual_counts``, cycled) and token limits (8, 16, 24, 32) vary from request to request."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    scale = float(vlm.model.get_input_embeddings().weight.detach().float().std())
    out = []
    for i in range(count):
        question = QUESTIONS[i % len(QUESTIONS)] if mixed else QUESTIONS[2]
        options = OPTIONS[i % len(OPTIONS)] if mixed else None
        prompt = vlm.encode_prompt(question, options)
        text = len(prompt.prefix_ids) + len(prompt.suffix_ids)
        visual = visual_counts[i % len(visual_counts)] if mixed and visual_counts else max(prompt_tokens - text, 1)
        tokens = torch.randn(visual, vlm.hidden_size, generator=generator) * scale
        limit = (8, 16, 24, 32)[i % 4] if mixed else new_tokens
        out.append(dict(visual_tokens=tokens, question=question, options=options,
                        sampling=vlm.sampling(max_new_tokens=limit)))
    return out


def prompt_length(vlm, request: Mapping) -> int:
    """Positions the LM reads for a request: the prompt's text ids and its visual tokens."""
    prompt = vlm.encode_prompt(request["question"], request["options"])
    return int(request["visual_tokens"].shape[0]) + len(prompt.prefix_ids) + len(prompt.suffix_ids)


# --------------------------------------------------------------------------------------------
# The four ways


def _engine_class():
    from mofserve.core.llm_engine import LLMEngine  # lazy: core.llm_engine imports torch and transformers

    class TimedEngine(LLMEngine):
        """``LLMEngine`` that logs each decode step's batch and time, and each prefill's time."""

        def __init__(self, *args, **kwargs) -> None:
            self.step_log: list[tuple[int, float]] = []
            self.prefill_spans: list[tuple[float, float]] = []
            super().__init__(*args, **kwargs)

        def _step(self) -> None:
            batch, t = len(self._running), time.perf_counter()
            super()._step()
            self.step_log.append((batch, (time.perf_counter() - t) * 1e3))

        def _prefill(self, s) -> None:
            t = time.perf_counter()
            super()._prefill(s)
            self.prefill_spans.append((t, time.perf_counter()))

    return TimedEngine


def run_engine(vlm, requests: Sequence[dict], max_sequences: int, together: bool) -> dict:
    """``LLMEngine`` on ``requests``: all submitted at once (``together``) or each after the previous
    ended. Per request: submitted, first token and last token times (s), tokens, token ids."""
    from mofserve.core.llm_engine import Delta, Failed, Finished  # lazy: core.llm_engine imports torch and transformers

    engine = _engine_class()(vlm, max_sequences=max_sequences)
    lock = threading.Condition()
    streams: dict[str, dict] = {}

    def emit(event) -> None:
        now = time.perf_counter()
        with lock:
            s = streams[event.request_id]
            if isinstance(event, Delta):
                s.setdefault("first", now)
                s["last"] = now
            elif isinstance(event, Finished):
                s.update(done=now, tokens=event.completion_tokens, ids=list(event.token_ids),
                         chosen=event.chosen_option, prefill_ms=event.prefill_ms)
            elif isinstance(event, Failed):
                s.update(done=now, error=repr(event.error))
            lock.notify_all()

    try:
        started = time.perf_counter()
        for i, request in enumerate(requests):
            rid = f"r{i}"
            with lock:
                streams[rid] = {"submitted": time.perf_counter()}
            engine.submit(rid, emit=emit, **request)
            if not together:
                with lock:
                    lock.wait_for(lambda rid=rid: "done" in streams[rid])
        with lock:
            lock.wait_for(lambda: all("done" in s for s in streams.values()))
        errors = [s["error"] for s in streams.values() if "error" in s]
        if errors:
            raise RuntimeError(f"llm engine: {errors[0]}")
    finally:
        engine.close()
    ordered = [streams[f"r{i}"] for i in range(len(requests))]
    steps = engine.step_log
    return {**summarise_streams(ordered, started, engine.prefill_spans), "steps": step_table(steps),
            "step_tokens_per_s": sum(b for b, _ in steps) * 1e3 / sum(ms for _, ms in steps) if steps else math.nan,
            "prefill_ms": latency_summary([(b - a) * 1e3 for a, b in engine.prefill_spans]), "streams": ordered}


def step_table(steps: Sequence[tuple[int, float]]) -> dict[str, dict]:
    """Median ms of a decode step per batch size, its count and the tokens/s it gives (batch / step)."""
    out = {}
    for batch in sorted({b for b, _ in steps}):
        times = [ms for b, ms in steps if b == batch]
        median = statistics.median(times)
        out[str(batch)] = {"steps": len(times), "median_ms": median, "tokens_per_s": batch * 1e3 / median}
    return out


def summarise_streams(streams: Sequence[Mapping], started: float, prefills: Sequence[tuple[float, float]] = ()) -> dict:
    """TTFT (first token - submitted), output tokens/s over the wall time, decode figures (with the
    prefills' spans, where known, taken out of the decode time)."""
    end = max(s.get("done", s.get("last", started)) for s in streams)
    tokens = sum(int(s.get("tokens", 0)) for s in streams)
    return {"sequences": len(streams), "wall_s": end - started, "output_tokens": tokens,
            "output_tokens_per_s": tokens / (end - started) if end > started else math.nan,
            "ttft_ms": latency_summary([(s["first"] - s["submitted"]) * 1e3 for s in streams if "first" in s]),
            **decode_figures(((s["first"], s["last"], int(s.get("tokens", 1)) - 1) for s in streams if "first" in s),
                             prefills)}


def run_hf_generate(vlm, requests: Sequence[dict]) -> dict:
    """transformers ``generate`` one request at a time on the same prompt embeddings (greedy), each
    token's time taken by a streamer."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    streams = []
    started = time.perf_counter()
    for request in requests:
        prompt = vlm.encode_prompt(request["question"], request["options"])
        embeds, _ = vlm.inputs_embeds(request["visual_tokens"], prompt)
        clock, submitted = Clock(), time.perf_counter()
        with torch.inference_mode():
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            out = vlm.model.generate(inputs_embeds=embeds, attention_mask=mask,
                                     max_new_tokens=request["sampling"].max_new_tokens, do_sample=False,
                                     temperature=None, top_p=None, top_k=None, pad_token_id=vlm.pad_token_id,
                                     streamer=clock)
        ids = out[0].tolist()
        times = clock.times[-len(ids):]  # the first put is the (empty) prompt
        streams.append({"submitted": submitted, "first": times[0], "last": times[-1], "done": times[-1],
                        "tokens": len(ids), "ids": ids})
    return {**summarise_streams(streams, started), "streams": streams}


def run_hf_continuous(model, prompt_lengths: Sequence[int], new_tokens: int, seed: int = 0) -> dict:
    """transformers' continuous batching (``init_continuous_batching``: paged KV cache, FIFO
    scheduler) with every request added at once: random token ids of the given prompt lengths (it
    takes ids, not embeddings), greedy, EOS off. The manager is started and warmed up by one request
    first (not timed); its cache holds every sequence (pages of 256 tokens)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    rng = np.random.default_rng(seed)
    vocab = int(model.config.vocab_size)
    prompts = [[int(t) for t in rng.integers(3, vocab, size=n)] for n in prompt_lengths]
    page = 256
    blocks = sum(math.ceil((n + new_tokens) / page) for n in prompt_lengths) + 4
    config = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=max(prompt_lengths) + 64,
                                      max_requests_per_batch=len(prompts), allow_block_sharing=False,
                                      use_cuda_graph=False, use_async_batching=False)
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                                  pad_token_id=int(model.config.pad_token_id or 0))
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
    manager.start()
    try:
        warm = manager.add_request(prompts[0][:64], max_new_tokens=2)
        _collect(manager, {warm})
        streams = {}
        started = time.perf_counter()
        for prompt in prompts:
            submitted = time.perf_counter()
            rid = manager.add_request(prompt, max_new_tokens=new_tokens, record_timestamps=True)
            streams[rid] = {"submitted": submitted}
        for rid, result in _collect(manager, set(streams)).items():
            times = result.timestamps or []
            if result.error or not times:
                raise RuntimeError(f"continuous batching: {rid}: {result.error or 'no timestamps'}")
            streams[rid].update(first=times[0], last=times[-1], done=times[-1], tokens=len(result.generated_tokens),
                                ids=list(result.generated_tokens))
    finally:
        manager.stop(block=True, timeout=30)
        with contextlib.suppress(Exception):
            manager.destroy()
    ordered = list(streams.values())
    return {**summarise_streams(ordered, started), "streams": ordered, "prompt_lengths": list(prompt_lengths),
            "config": {"page_size": page, "num_blocks": blocks, "max_batch_tokens": config.max_batch_tokens,
                       "attention": str(model.config._attn_implementation)}}


def _collect(manager, ids: set[str], timeout_s: float = 1800.0) -> dict:
    results, end = {}, time.monotonic() + timeout_s
    while len(results) < len(ids):
        if time.monotonic() > end or not manager.is_running():
            raise RuntimeError(f"continuous batching: {len(ids) - len(results)} requests unfinished")
        result = manager.get_result(timeout=1)
        if result is not None and result.request_id in ids and result.is_finished():
            results[result.request_id] = result
    return results


# --------------------------------------------------------------------------------------------
# Per-layer cost and the extrapolation


@contextlib.contextmanager
def depth(model, layers: int):
    """The LM with ``layers`` decoder layers: its own, cut short or cycled (same objects: the prefill
    without cache and ``kv_slots.decode_step`` index layers by position, so this is sound for timing)."""
    body, config = model.model, model.config
    own = body.layers
    saved = (config.num_hidden_layers, getattr(config, "layer_types", None))
    import torch

    body.layers = torch.nn.ModuleList([own[i % len(own)] for i in range(layers)])
    config.num_hidden_layers = layers
    if saved[1] is not None:
        config.layer_types = [saved[1][i % len(saved[1])] for i in range(layers)]
    try:
        yield model
    finally:
        body.layers = own
        config.num_hidden_layers = saved[0]
        if saved[1] is not None:
            config.layer_types = saved[1]


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = fixed + slope * x`` -> (fixed, slope)."""
    if len(xs) < 2 or len(set(xs)) < 2:
        raise ValueError("fit_line: need at least two distinct x")
    slope, fixed = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    return float(fixed), float(slope)


def extrapolate(by_depth: Mapping[int, float], layers: int) -> dict:
    """The fit of ms per depth and its value at ``layers`` (and the fit's worst relative error).

    A cost has no negative part: when noise (other processes on a shared machine) gives the line a
    negative fixed part, the fit goes through the origin instead (all the time per layer; an upper
    bound for a phase with a real fixed part, such as a decode step's LM head) and says so."""
    xs = sorted(by_depth)
    ys = [by_depth[x] for x in xs]
    fixed, per_layer = fit_line(xs, ys)
    through_origin = fixed < 0
    if through_origin:
        fixed, per_layer = 0.0, sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    worst = max(abs(fixed + per_layer * x - y) / y for x, y in zip(xs, ys, strict=True))
    return {"measured_ms": {str(x): by_depth[x] for x in xs}, "fixed_ms": fixed, "per_layer_ms": per_layer,
            "through_origin": through_origin, "fit_worst_error": worst, "layers": layers,
            "extrapolated_ms": fixed + per_layer * layers}


def layer_costs(vlm, prompt_tokens: int, batches: Sequence[int], depths: Sequence[int] = DEFAULT_DEPTHS,
                layers: int = 32, rounds: int = 6) -> dict:
    """Prefill of ``prompt_tokens`` positions and one decode step at each batch (context
    ``prompt_tokens``) at each depth, in ``rounds`` rounds that visit the depths in a rotating order
    (so that load from other processes lands on every depth alike); the best (min) time per depth
    enters the fit (contention only adds time; the medians are kept too), and the fit's value at
    ``layers`` is the extrapolation."""
    import torch

    # lazy: core.kv_slots imports torch and transformers
    from mofserve.core.kv_slots import SlotCache, SlotGeometry, decode_step

    model = vlm.model
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    generator = torch.Generator().manual_seed(0)
    scale = float(model.get_input_embeddings().weight.detach().float().std())
    embeds = (torch.randn(1, prompt_tokens, vlm.hidden_size, generator=generator) * scale).to(vlm.dtype)
    caches = {(n, b): SlotCache(SlotGeometry(n, kv_heads, head_dim, b, prompt_tokens + 8, vlm.dtype), vlm.device)
              for n in depths for b in batches}
    prefill: dict[int, list[float]] = {n: [] for n in depths}
    steps: dict[int, dict[int, list[float]]] = {b: {n: [] for n in depths} for b in batches}

    for r in range(rounds + 1):  # round 0 warms every depth up, untimed
        for n in [*depths[r % len(depths):], *depths[:r % len(depths)]]:
            with depth(model, n), torch.inference_mode():
                t = time.perf_counter()
                model(inputs_embeds=embeds if r else embeds[:, :64], use_cache=False, logits_to_keep=1)
                if r:
                    prefill[n].append((time.perf_counter() - t) * 1e3)
                for batch in batches:
                    lengths = torch.full((batch,), prompt_tokens, dtype=torch.long)
                    step_in = embeds[0, :batch, None, :].expand(batch, 1, -1).contiguous()
                    times = []
                    for _ in range(3):
                        t = time.perf_counter()
                        decode_step(model, caches[n, batch], step_in, lengths)
                        times.append((time.perf_counter() - t) * 1e3)
                    if r:
                        steps[batch][n].append(min(times))
    del caches
    for n in depths:
        log(f"depth {n}: prefill best {min(prefill[n]):.0f} ms, decode step best " +
            ", ".join(f"batch {b} {min(steps[b][n]):.0f} ms" for b in batches))

    def fit(times: Mapping[int, list[float]]) -> dict:
        out = extrapolate({n: min(v) for n, v in times.items()}, layers)
        out["median_ms"] = {str(n): statistics.median(v) for n, v in times.items()}
        return out

    return {"prompt_tokens": prompt_tokens, "own_layers": len(model.model.layers), "depths": list(depths),
            "layers": layers, "rounds": rounds, "prefill": fit(prefill),
            "decode_step": {str(b): fit(steps[b]) for b in batches}}


def scale_factors(costs: Mapping) -> dict:
    """How much longer the ``layers``-deep LM takes than the measured one (``own_layers``): per phase,
    (fixed + layers x per_layer) / (fixed + own x per_layer)."""
    own = costs["own_layers"]

    def factor(fit):
        return fit["extrapolated_ms"] / (fit["fixed_ms"] + fit["per_layer_ms"] * own)

    return {"prefill": factor(costs["prefill"]),
            "decode_step": {b: factor(fit) for b, fit in costs["decode_step"].items()}}


def measure_for_load(profile_name: str, config) -> dict:
    """For ``bench load --extrapolate-layers N``: the served LM's per-layer costs at the prompt
    length of the sweep's first mode and at batch 1 and the largest concurrency (in process, bf16
    or whatever the profile serves), and the scale factors the report applies to the measured
    prefill and decode times."""
    import torch

    from mofserve.core.checkpoints import resolve_profile  # lazy: core.checkpoints imports torch

    # lazy: core.language_model imports torch and transformers
    from mofserve.core.language_model import VisualLanguageModel

    profile = get_profile(profile_name)
    paths = resolve_profile(profile)
    threads = torch.get_num_threads()
    vlm = VisualLanguageModel.from_checkpoint(paths.llava, dtype=profile.serving.llm_dtype)
    try:
        if profile.serving.llm_threads:
            torch.set_num_threads(profile.serving.llm_threads)
        mode = next(iter(config.mix))
        visual = profile.num_patches * (2 if mode == "interleaved" else 1)
        prompt = vlm.encode_prompt(config.question, config.options or None)
        tokens = visual + len(prompt.prefix_ids) + len(prompt.suffix_ids)
        batches = sorted({1, max(config.concurrency or [1])})
        costs = layer_costs(vlm, tokens, batches, layers=config.extrapolate_layers)
    finally:
        torch.set_num_threads(threads)
        del vlm
    return {**costs, "profile": profile_name, "mode": mode, "factors": scale_factors(costs)}


# --------------------------------------------------------------------------------------------
# Agreement


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (the shorter one's length if one is a prefix), None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_answers(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> dict:
    """Per request where ``other``'s tokens first differ from ``reference``'s; the share identical and
    the share of reference tokens before the first difference."""
    firsts = [first_difference(a, b) for a, b in zip(reference, other, strict=True)]
    kept = sum(len(a) if f is None else f for a, f in zip(reference, firsts, strict=True))
    total = sum(len(a) for a in reference)
    return {"identical": sum(f is None for f in firsts), "requests": len(firsts),
            "identical_share": sum(f is None for f in firsts) / len(firsts) if firsts else math.nan,
            "tokens_before_first_difference_share": kept / total if total else math.nan, "first_difference": firsts}


def agreement(vlm, count: int, visual_counts: Sequence[int], seed: int = 1) -> dict:
    """Greedy tokens of ``count`` mixed requests: engine batched vs one at a time vs ``generate``."""
    requests = synthetic_requests(vlm, count, 0, 0, seed=seed, mixed=True, visual_counts=visual_counts)
    batched = run_engine(vlm, requests, max_sequences=count, together=True)["streams"]
    single = run_engine(vlm, requests, max_sequences=1, together=False)["streams"]
    generated = []
    for r in requests:
        answer = vlm.answer(r["visual_tokens"], r["question"], r["options"],
                            max_new_tokens=r["sampling"].max_new_tokens)
        generated.append(list(answer.token_ids))
    stops = {vlm.model.generation_config.eos_token_id} - {None}
    strip = lambda ids: [t for t in ids if t not in stops]  # noqa: E731 (generate drops EOS)
    one = [s["ids"] for s in single]
    return {"dtype": str(vlm.dtype).replace("torch.", ""), "hidden_size": vlm.hidden_size,
            "requests": [{"visual_tokens": int(r["visual_tokens"].shape[0]), "question": r["question"],
                          "options": r["options"], "max_new_tokens": r["sampling"].max_new_tokens} for r in requests],
            "batched_vs_one_at_a_time": compare_answers(one, [s["ids"] for s in batched]),
            "chosen_agree": sum(a["chosen"] == b["chosen"] for a, b in zip(single, batched, strict=True)),
            "generate_vs_one_at_a_time": compare_answers([strip(i) for i in one], generated),
            "tokens": {"one_at_a_time": one, "batched": [s["ids"] for s in batched], "generate": generated}}


if __name__ == "__main__":
    # the command (its flags, the run, the report) is llm_report's, which imports this module: run it
    # as __main__ by name, so that this lower module never imports the higher one
    import runpy

    runpy.run_module("mofserve.benchmarks.llm_report", run_name="__main__", alter_sys=True)
