"""The ``llm`` stage of the GPU check (``benchmarks/gpu_check.py``): the in-flight batching engine
(``core.llm_engine``) on the paper's language model at full depth.

A ``LlamaForCausalLM`` of Vicuna-7B's shape (4096 wide, 11008 MLP, 32 heads, 32 KV heads, 32
layers, 32000 ids, 4096 positions) is built directly on the GPU in bf16 with seeded random weights
(nothing on disk), with a byte-level BPE tokenizer trained in-process on the prompt template (as
``core.seeded`` trains the tiny profile's). The model's EOS is unset, so every sequence runs to
its token limit. Measured, in this order (the part is rewritten after each, so a stage cut short
keeps what it has):

1. ``prefill``: ms for a 640-position (A-MoF: 576 visual tokens and the prompt) and a 1216-position
   (I-MoF) prompt of random visual tokens, through the engine (median of 3), and its TFLOP/s.
2. ``decode``: ``N`` sequences of 64 new tokens each (greedy) submitted at once to
   ``LLMEngine(max_sequences=N)`` for N = 8 and 32, against one at a time
   (``max_sequences=1``, 8 sequences: the rate of one at a time does not depend on how many wait,
   so 32 one at a time is 8 scaled, and that is what concurrency 1 gets). Tokens/s end to end
   (prefills and the one-admission-per-turn ramp included) and at full batch (the decode steps
   between the last admission and the first sequence finishing), ms per decode step, and whether
   the batched greedy tokens are the one-at-a-time ones (bf16).
3. ``joining``: 4 I-MoF-sized prompts (1216 positions) join 4 running streams, the prefill whole
   vs in chunks of 256 and 512 fused with the decode steps (``benchmarks/llm_joining.py``, as
   ``make bench-llm`` runs it on the CPU): the running streams' inter-token gaps and the joiners' TTFT.
4. ``steps``: one bare ``core.kv_slots.decode_step`` per batch size at the prompt's context: ms,
   the host's time to enqueue it (close to the step's time: launch-bound), the bytes it must read
   (every weight but the embedding table, and the batch's K/V) and so the share of the card's HBM
   bandwidth it reaches (by card name: 3.35 TB/s H100 SXM, 4.8 TB/s H200).
5. ``graphs``: the same step replayed as a CUDA graph (``decode_step`` given its attended length,
   fixed at capture, as a graph needs, instead of reading it from the device; checked against the
   step that reads it), the size of that lever.

The report's line and section on these (``llm_summary_line``, ``llm_markdown``) are in
``gpu_check_report``.
"""

from __future__ import annotations

import statistics
import time

from mofserve.benchmarks.gpu_check_common import Part, Settings, _device, _ms, _params, _pct, log, synchronize
from mofserve.benchmarks.llm_joining import joining
from mofserve.benchmarks.llm_stage import synthetic_requests
from mofserve.core.conversation import build_prompt

# Vicuna-7B / LLaMA-7B, the LM of the paper's LLaVA-1.5 (core.profiles' "paper" LanguageSpec)
LLM_SHAPES = {
    "paper": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                  num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, vocab_size=512, max_position_embeddings=2048),  # the tiny profile's LM
}
# peak HBM bandwidth by card name (first match; vendor data sheets); others: no share reported
HBM_BYTES_PER_S = (("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                   ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12))
QUESTION = "What is shown in the image? Describe it in detail."
PREFILL_REPEATS = 3
SEED = 0
JOINING_CHUNKS = (256, 512)  # each against the whole prompt, as `make bench-llm` measures them on the CPU


def hbm_peak(card: str) -> float | None:
    return next((rate for name, rate in HBM_BYTES_PER_S if name in card), None)


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the prompt template (ids < ``vocab_size``); ids it lacks decode to nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 1024), special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([build_prompt(QUESTION, None)] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>")


def build_vlm(profile: str, device):
    """``VisualLanguageModel`` over a seeded random bf16 LLaMA built on ``device``; its EOS unset."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mofserve.core.checkpoints import quiet_transformers  # lazy: core.checkpoints imports torch

    # lazy: core.language_model imports torch and transformers
    from mofserve.core.language_model import VisualLanguageModel

    quiet_transformers()
    shape = LLM_SHAPES["tiny" if profile == "tiny" else "paper"]
    tokenizer = build_tokenizer(shape["vocab_size"])
    config = LlamaConfig(**shape, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # drawn in bf16 on the device: 13.5 GB, no fp32 copy
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None  # no early stop: every sequence writes its token limit
    return VisualLanguageModel(model, tokenizer, default_max_new_tokens=1)


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of every parameter, bytes a decode step reads: all but the embedding table's)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    return total, total - embed.numel() * embed.element_size()


def prefill_flops(params: int, layers: int, hidden: int, tokens: int) -> float:
    """Matmul FLOPs of a prompt: 2 per weight per position, and causal attention's QK^T and AV."""
    return 2.0 * params * tokens + 2.0 * layers * hidden * tokens * tokens


def make_requests(vlm, count: int, prompt_tokens: int, new_tokens: int, seed: int) -> list[dict]:
    """``count`` requests of random visual tokens, ``prompt_tokens`` positions with the prompt text."""
    import torch

    prompt = vlm.encode_prompt(QUESTION)
    visual = prompt_tokens - len(prompt.prefix_ids) - len(prompt.suffix_ids)
    if visual < 1:
        raise ValueError(f"llm prompt of {prompt_tokens} positions: the text alone is "
                         f"{prompt_tokens - visual} (raise --llm-prompts)")
    generator = torch.Generator(device=vlm.device).manual_seed(seed)
    sampling = vlm.sampling(max_new_tokens=new_tokens)
    return [dict(visual_tokens=torch.randn(visual, vlm.hidden_size, generator=generator, device=vlm.device,
                                           dtype=vlm.dtype), question=QUESTION, options=None, sampling=sampling)
            for _ in range(count)]


def kv_cache_mb(vlm, slots: int, tokens: int) -> int:
    """The engine's KV budget for ``slots`` sequences of ``tokens`` positions (0: each the whole context)."""
    from mofserve.core.kv_slots import geometry  # lazy: core.kv_slots imports torch and transformers

    per_token = geometry(vlm.model, slots, 0).bytes_per_token
    tokens = -(-tokens // 64) * 64
    if tokens >= vlm.context_length:
        return 0
    return -(-slots * tokens * per_token // 2**20)


def run_engine(vlm, slots: int, requests: list[dict], timeout: float) -> dict:
    """Submit ``requests`` at once to ``LLMEngine(max_sequences=slots)``; tokens/s end to end and at
    full batch (from the last admission that fills the batch to the first sequence finishing)."""
    # lazy: core.llm_engine imports torch and transformers
    from mofserve.core.llm_engine import Delta, Finished, LLMEngine

    new_tokens = requests[0]["sampling"].max_new_tokens
    prompt_tokens = vlm.encode_prompt(QUESTION).length(requests[0]["visual_tokens"].shape[0])
    engine = LLMEngine(vlm, max_sequences=slots, kv_cache_mb=kv_cache_mb(vlm, slots, prompt_tokens + new_tokens))
    full = min(slots, len(requests))
    marks: dict[str, tuple[float, int]] = {}
    firsts = 0

    def on_event(event) -> None:  # the engine's thread: its step counter is current
        nonlocal firsts
        if isinstance(event, Delta) and event.first:
            firsts += 1
            if firsts == full:
                marks["full"] = (time.perf_counter(), engine.steps)
        elif isinstance(event, Finished) and "end" not in marks:
            marks["end"] = (time.perf_counter(), engine.steps)

    try:
        started = time.perf_counter()
        results = engine.generate_many(requests, on_event=on_event, timeout=timeout)
        wall = time.perf_counter() - started
        stats = engine.stats()
    finally:
        engine.close()  # its slot cache goes with it when this returns
    tokens = sum(r.completion_tokens for r in results)
    out = {"sequences": len(results), "max_sequences": slots, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
           "seconds": round(wall, 3), "tokens": tokens, "tokens_per_s": tokens / wall, "steps": stats["steps"],
           "mean_batch": stats["batched_rows"] / stats["steps"] if stats["steps"] else None,
           "prefill_ms_median": statistics.median(r.prefill_ms for r in results),
           "all_ran_to_their_limit": all(r.finish_reason == "length" and r.completion_tokens == new_tokens
                                         for r in results),
           "full_batch_steps": 0, "full_batch_step_ms": None, "full_batch_tokens_per_s": None}
    if "full" in marks and "end" in marks and marks["end"][1] > marks["full"][1]:
        steps = marks["end"][1] - marks["full"][1]
        seconds = marks["end"][0] - marks["full"][0]
        out.update(full_batch_steps=steps, full_batch_step_ms=1e3 * seconds / steps,
                   full_batch_tokens_per_s=full * steps / seconds)
    out["token_ids"] = [list(r.token_ids) for r in results]  # compared, then dropped from the report
    return out


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """How many sequences have the same greedy tokens, and the mean length of their common start."""
    pairs = list(zip(reference, other, strict=False))
    common = [next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), min(len(x), len(y)))
              for x, y in pairs]
    return {"sequences": len(pairs), "identical": sum(x == y for x, y in pairs),
            "mean_common_prefix": statistics.mean(common) if common else None}


def step_inputs(vlm, batch: int, context: int):
    """A slot cache of ``batch`` sequences at ``context`` positions (zeros: attention costs the same)."""
    import torch

    from mofserve.core.kv_slots import SlotCache, geometry  # lazy: core.kv_slots imports torch and transformers

    per_token = geometry(vlm.model, batch, 0).bytes_per_token
    cache = SlotCache(geometry(vlm.model, batch, batch * (context + 16) * per_token), vlm.device)
    generator = torch.Generator(device=vlm.device).manual_seed(batch)
    embeds = torch.randn(batch, 1, vlm.hidden_size, generator=generator, device=vlm.device, dtype=vlm.dtype)
    lengths = torch.full((batch,), context, dtype=torch.long, device=vlm.device)
    return cache, embeds, lengths


def _timed(call, device, runs: int, seconds: float) -> tuple[list[float], list[float]]:
    """(ms per call, ms until ``call`` returned, before the device finished) over the timed runs."""
    totals, enqueued = [], []
    window = time.perf_counter()
    while len(totals) < 3 or (len(totals) < runs and time.perf_counter() - window < seconds):
        synchronize(device)
        started = time.perf_counter()
        call()
        returned = time.perf_counter()
        synchronize(device)
        totals.append(1e3 * (time.perf_counter() - started))
        enqueued.append(1e3 * (returned - started))
    return totals, enqueued


def time_step(vlm, batch: int, context: int, runs: int, seconds: float, read_bytes: int, peak: float | None) -> dict:
    from mofserve.core.kv_slots import decode_step  # lazy: core.kv_slots imports torch and transformers

    cache, embeds, lengths = step_inputs(vlm, batch, context)
    for _ in range(2):
        decode_step(vlm.model, cache, embeds, lengths)
    totals, enqueued = _timed(lambda: decode_step(vlm.model, cache, embeds, lengths), vlm.device, runs, seconds)
    step_ms = statistics.median(totals)
    return {"batch": batch, "context": context, "runs": len(totals), "step_ms": step_ms, "min_ms": min(totals),
            "enqueue_ms": statistics.median(enqueued), "bytes_read": read_bytes, "tokens_per_s": batch / step_ms * 1e3,
            "hbm_share": read_bytes / (min(totals) / 1e3) / peak if peak else None}


def time_graph(vlm, batch: int, context: int, runs: int, seconds: float, read_bytes: int, peak: float | None) -> dict:
    """The step captured once as a CUDA graph and replayed; its logits against ``decode_step``'s."""
    import torch

    from mofserve.core.kv_slots import decode_step  # lazy: core.kv_slots imports torch and transformers

    cache, embeds, lengths = step_inputs(vlm, batch, context)
    reference = decode_step(vlm.model, cache, embeds, lengths)
    eager = decode_step(vlm.model, cache, embeds, lengths, context + 1)
    out: dict = {"batch": batch, "copy_max_abs_diff": float((eager - reference).abs().max())}
    if vlm.device.type != "cuda":
        return {**out, "graph": "needs CUDA (the fixed-length step is checked against decode_step only)"}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream before capture (torch.cuda.graphs' rule)
        for _ in range(2):
            decode_step(vlm.model, cache, embeds, lengths, context + 1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    started = time.perf_counter()
    with torch.cuda.graph(graph):
        logits = decode_step(vlm.model, cache, embeds, lengths, context + 1)
    graph.replay()
    torch.cuda.synchronize()
    out.update(capture_s=round(time.perf_counter() - started, 3),
               graph_max_abs_diff=float((logits - reference).abs().max()))
    totals, _ = _timed(graph.replay, vlm.device, runs, seconds)
    step_ms = statistics.median(totals)
    out.update(step_ms=step_ms, min_ms=min(totals), runs=len(totals), tokens_per_s=batch / step_ms * 1e3,
               hbm_share=read_bytes / (min(totals) / 1e3) / peak if peak else None)
    del graph
    return out


def stage_llm(settings: Settings, part: Part, deadline: float) -> None:
    import torch

    from mofserve.core.kv_slots import geometry  # lazy: core.kv_slots imports torch and transformers

    device = _device(settings)
    left = lambda: deadline - time.time()  # noqa: E731
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = hbm_peak(card)
    started = time.perf_counter()
    vlm = build_vlm(settings.profile, device)
    synchronize(device)
    model = vlm.model
    total_bytes, step_weights = weight_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    config = model.config
    embed_params = model.get_input_embeddings().weight.numel()
    per_token = geometry(model, 1, 0).bytes_per_token
    info: dict = {"model": {
        "layers": config.num_hidden_layers, "hidden": config.hidden_size, "intermediate": config.intermediate_size,
        "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads, "vocab": config.vocab_size,
        "context": config.max_position_embeddings, "dtype": str(model.dtype).replace("torch.", ""),
        "params": params, "weight_bytes": total_bytes, "decode_weight_bytes": step_weights,
        "kv_bytes_per_token": per_token, "attention": getattr(config, "_attn_implementation", None),
        "tokenizer_ids": len(vlm.tokenizer), "card": card, "hbm_peak_bytes_per_s": peak,
        "build_s": round(time.perf_counter() - started, 2)}}
    part.update(llm=info)
    log(f"llm: {_params(params)} parameters ({total_bytes / 1e9:.1f} GB {info['model']['dtype']}) built on "
        f"{device} in {info['model']['build_s']} s")

    def enough(what: str, seconds: float = 5.0) -> bool:
        if left() > seconds:
            return True
        info["cut_short"] = f"time budget reached before {what}"
        part.update(llm=info)
        log(f"llm: {info['cut_short']}")
        return False

    prompts, new_tokens = settings.llm_prompts, settings.llm_new_tokens
    run_engine(vlm, 1, make_requests(vlm, 1, prompts[0], min(4, new_tokens), SEED + 99), left())  # warm-up
    info["prefill"] = {}
    for length in prompts:
        if not enough(f"the prefill of {length}"):
            return
        run = run_engine(vlm, 1, make_requests(vlm, PREFILL_REPEATS, length, 1, SEED + length), left())
        visual = length - vlm.encode_prompt(QUESTION).length(0)
        flops = prefill_flops(params - embed_params, config.num_hidden_layers, config.hidden_size, length)
        info["prefill"][str(length)] = {"prompt_tokens": length, "visual_tokens": visual,
                                        "median_ms": run["prefill_ms_median"],
                                        "tflops_per_s": flops / (run["prefill_ms_median"] / 1e3) / 1e12}
        part.update(llm=info)
        log(f"llm: prefill {length} positions: {run['prefill_ms_median']:.1f} ms")

    context = prompts[0]
    most = max(settings.llm_concurrency)
    requests = make_requests(vlm, max(most, settings.llm_serial), context, new_tokens, SEED)
    decode: dict = {"prompt_tokens": context, "new_tokens": new_tokens, "batched": {}}
    info["decode"] = decode
    if not enough("decoding one at a time"):
        return
    serial = _attempt(run_engine, vlm, 1, requests[:settings.llm_serial], left())
    decode["one_at_a_time"] = serial
    if "error" in serial:
        part.update(llm=info)
        return  # no rate to compare the batched runs with
    serial_ids = serial.pop("token_ids")
    if serial["full_batch_step_ms"] and peak:  # the engine's batch-1 step: weights and one sequence's K/V
        read = step_weights + (context + new_tokens // 2) * per_token
        serial["hbm_share"] = read / (serial["full_batch_step_ms"] / 1e3) / peak
    decode["one_at_a_time"] = serial
    part.update(llm=info)
    log(f"llm: one at a time, {serial['sequences']} sequences: {serial['tokens_per_s']:.1f} tokens/s, "
        f"{_ms(serial['full_batch_step_ms'])} ms/step")
    for n in sorted(c for c in settings.llm_concurrency if c > 1):
        if not enough(f"decoding {n} batched"):
            return
        run = decode["batched"][str(n)] = _attempt(run_engine, vlm, n, requests[:n], left())
        if "error" in run:
            part.update(llm=info)
            continue
        run["agreement_with_one_at_a_time"] = agreement(serial_ids, run.pop("token_ids"))
        run["one_at_a_time_tokens_per_s"] = serial["tokens_per_s"]
        run["one_at_a_time_scaled_from"] = min(n, serial["sequences"])
        run["ratio"] = run["tokens_per_s"] / serial["tokens_per_s"]
        if run["full_batch_tokens_per_s"] and serial["full_batch_tokens_per_s"]:
            run["full_batch_ratio"] = run["full_batch_tokens_per_s"] / serial["full_batch_tokens_per_s"]
        part.update(llm=info)
        log(f"llm: {n} batched: {run['tokens_per_s']:.1f} tokens/s ({run['ratio']:.2f}x one at a time), "
            f"{_ms(run['full_batch_step_ms'])} ms/step at full batch")

    if enough("a request joining running streams", 15.0):
        # chunked prefill fused with the decode steps vs the whole prompt (benchmarks/llm_joining.py)
        info["joining"] = _attempt(joining, vlm, synthetic_requests, JOINING_CHUNKS)
        part.update(llm=info)
        runs = info["joining"].get("runs", {})
        log("llm: joining: " + ", ".join(f"chunk {c}: running ITL p99 {r['running_itl_ms']['p99']:.1f} ms, joiner "
                                         f"TTFT p50 {r['joiner_ttft_ms']['p50']:.1f} ms" for c, r in runs.items()))

    batches = sorted({1, *settings.llm_concurrency})
    info["steps"] = {}
    for batch in batches:
        if not enough(f"the bare decode step at batch {batch}"):
            return
        read = step_weights + batch * (context + 1) * per_token
        row = info["steps"][str(batch)] = _attempt(time_step, vlm, batch, context, settings.max_runs,
                                                   settings.measure_s, read, peak)
        part.update(llm=info)
        if "error" in row:
            continue
        log(f"llm: decode_step batch {batch}: {row['step_ms']:.2f} ms (enqueued in {row['enqueue_ms']:.2f} ms), "
            f"HBM share {_pct(row['hbm_share'])}")
    info["graphs"] = {}
    for batch in batches:
        if not enough(f"the CUDA graph at batch {batch}"):
            return
        read = step_weights + batch * (context + 1) * per_token
        graph = info["graphs"][str(batch)] = _attempt(time_graph, vlm, batch, context, settings.max_runs,
                                                      settings.measure_s, read, peak)
        part.update(llm=info)
        if "error" in graph:  # a failed capture can leave the CUDA context unusable: stop here
            break
        diff = graph.get("graph_max_abs_diff", graph.get("copy_max_abs_diff"))
        log(f"llm: CUDA graph batch {batch}: {_ms(graph.get('step_ms'))} ms/step, logits within {diff} of "
            "decode_step's")


def _attempt(measure, *args) -> dict:
    """``measure(*args)``, or its error as a result: an out-of-memory or a failed capture is a finding
    (logged and reported), and the measurements after it still run."""
    try:
        return measure(*args)
    except Exception as error:
        import torch

        log(f"llm: {measure.__name__} failed: {error!r}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(error).__name__}: {error}"[:300]}
