"""The ``joining`` section of the LLM-stage benchmark: what a request joining the running batch
costs the streams already decoding, with its prefill in one forward vs in chunks.

Why: ``LLMEngine`` admits one request a turn, and before chunking its whole prefill ran between two
decode steps. On the paper's shapes an I-MoF prompt is ~1200 positions, ~1.4 s of a 2-layer 7B-wide
LM on 2 CPU cores (~20 s at 32 layers): every running stream then got no token for that long, which
the served benchmark showed as the inter-token p99 (docs/benchmarks.md). Chunking trades a little of
the joiner's time to first token for a bound on the others' gap.

The scenario, one engine per chunk size on the same LM, requests and process: ``running`` streams
start and decode; once each has its first token, ``joiners`` requests (I-MoF-sized prompts by
default) are submitted together; when every joiner has finished, the running streams are cancelled.
Measured over the window from the joiners' submission to the last joiner's first token: the running
streams' inter-token gaps (p50, p99, max) and decode tokens/s; for the joiners, TTFT from submission.
Ratios are against chunk 0 (the whole prompt at once) in the same run.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping, Sequence

from mofserve.core.reports import number, times

from .stats import latency_summary

DEFAULT_CHUNKS = (0, 256, 512)
DEFAULT_RUNNING = 4
DEFAULT_JOINERS = 4
JOINER_PROMPT_TOKENS = 1216  # I-MoF: 1152 visual tokens + the llava_v1 prompt (FACTS.md)
JOINER_NEW_TOKENS = 8


def run_joining(vlm, running: Sequence[dict], joiners: Sequence[dict], prefill_chunk: int,
                timeout_s: float = 1800.0) -> dict:
    """One engine with ``prefill_chunk``: ``running`` decode, ``joiners`` arrive (see module doc)."""
    from mofserve.core.llm_engine import Delta, Failed, Finished, LLMEngine  # lazy: torch, transformers

    engine = LLMEngine(vlm, max_sequences=len(running) + len(joiners), prefill_chunk=prefill_chunk)
    lock = threading.Condition()
    stamps: dict[str, list[float]] = {}
    ended: dict[str, str] = {}

    def emit(event) -> None:
        now = time.perf_counter()
        with lock:
            if isinstance(event, Delta):
                stamps[event.request_id].append(now)
            elif isinstance(event, Finished):
                ended[event.request_id] = event.finish_reason
            elif isinstance(event, Failed):
                ended[event.request_id] = f"error: {event.error!r}"
            lock.notify_all()

    runner_ids = [f"run{i}" for i in range(len(running))]
    joiner_ids = [f"join{i}" for i in range(len(joiners))]
    try:
        for rid, request in zip(runner_ids, running, strict=True):
            stamps[rid] = []
            engine.submit(rid, emit=emit, **request)
        with lock:
            if not lock.wait_for(lambda: all(stamps[r] for r in runner_ids), timeout_s):
                raise TimeoutError("joining: the running streams never started")
        submitted = time.perf_counter()
        chunks_before = engine.stats()["prefill_chunks"]
        for rid, request in zip(joiner_ids, joiners, strict=True):
            stamps[rid] = []
            engine.submit(rid, emit=emit, **request)
        with lock:
            if not lock.wait_for(lambda: all(j in ended for j in joiner_ids), timeout_s):
                raise TimeoutError("joining: the joiners did not finish")
        chunks = engine.stats()["prefill_chunks"] - chunks_before
        for rid in runner_ids:
            engine.cancel(rid)
        with lock:
            lock.wait_for(lambda: all(r in ended for r in runner_ids), timeout_s)
    finally:
        engine.close()
    errors = [reason for reason in ended.values() if reason.startswith("error")]
    if errors:
        raise RuntimeError(f"joining: {errors[0]}")
    window_end = max(stamps[j][0] for j in joiner_ids)
    gaps, tokens = [], 0
    for rid in runner_ids:
        inside = [t for t in stamps[rid] if t <= window_end]
        last_before = max((t for t in inside if t <= submitted), default=submitted)
        during = [last_before, *(t for t in inside if t > submitted)]
        gaps += [(b - a) * 1e3 for a, b in itertools.pairwise(during)]
        tokens += len(during) - 1
        if stamps[rid] and stamps[rid][-1] > window_end:  # the wait for the window's next token counts too
            gaps.append((min(t for t in stamps[rid] if t > window_end) - during[-1]) * 1e3)
    window_s = window_end - submitted
    return {"prefill_chunk": prefill_chunk, "prefill_forwards": chunks, "window_s": window_s,
            "running_itl_ms": latency_summary(gaps),
            "running_tokens_in_window": tokens, "running_tokens_per_s": tokens / window_s if window_s > 0 else 0.0,
            "joiner_ttft_ms": latency_summary([(stamps[j][0] - submitted) * 1e3 for j in joiner_ids])}


def joining(vlm, synthetic_requests, chunks: Sequence[int] = DEFAULT_CHUNKS, running: int = DEFAULT_RUNNING,
            joiners: int = DEFAULT_JOINERS, running_prompt_tokens: int = 640,
            joiner_prompt_tokens: int = JOINER_PROMPT_TOKENS) -> dict:
    """Each chunk size on the same requests; ratios against chunk 0 (the whole prompt at once)."""
    # the running streams outlast the joins: as long an answer as a request may ask for and a slot holds
    long = min(vlm.max_new_tokens_limit, vlm.model.config.max_position_embeddings - running_prompt_tokens)
    runners = synthetic_requests(vlm, running, running_prompt_tokens, long, seed=11)
    arrivals = synthetic_requests(vlm, joiners, joiner_prompt_tokens, JOINER_NEW_TOKENS, seed=12)
    runs = {str(chunk): run_joining(vlm, runners, arrivals, chunk) for chunk in (0, *[c for c in chunks if c])}
    base = runs["0"]
    for r in runs.values():
        r["itl_p99_vs_whole"] = r["running_itl_ms"]["p99"] / base["running_itl_ms"]["p99"]
        r["itl_max_vs_whole"] = r["running_itl_ms"]["max"] / base["running_itl_ms"]["max"]
        r["ttft_p50_vs_whole"] = r["joiner_ttft_ms"]["p50"] / base["joiner_ttft_ms"]["p50"]
        r["ttft_max_vs_whole"] = r["joiner_ttft_ms"]["max"] / base["joiner_ttft_ms"]["max"]
    return {"running": running, "joiners": joiners, "running_prompt_tokens": running_prompt_tokens,
            "joiner_prompt_tokens": joiner_prompt_tokens, "runs": runs}


def format_joining(joining: Mapping) -> str:
    """The section's table (Markdown), for ``bench llm``'s report and the GPU check's."""
    if joining.get("error"):
        return f"Failed: {joining['error']}"
    lines = [f"{joining['running']} streams decode ({joining['running_prompt_tokens']} prompt positions); "
             f"{joining['joiners']} requests of {joining['joiner_prompt_tokens']} positions join together. Over the "
             "window from their submission to the last one's first token: the running streams' gaps between tokens "
             "and tokens/s, and the joiners' TTFT; x = against chunk 0 (the whole prompt in one forward), same run.",
             "", "| prefill chunk | prefill forwards | running ITL p50 ms | p99 ms | max ms | p99 x | "
             "running tokens/s | joiner TTFT p50 ms | max ms | TTFT p50 x | window s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for chunk, r in joining["runs"].items():
        itl, ttft = r["running_itl_ms"], r["joiner_ttft_ms"]
        lines.append(f"| {chunk if chunk != '0' else '0 (whole)'} | {r['prefill_forwards']} | {number(itl['p50'])} | "
                     f"{number(itl['p99'])} | {number(itl['max'])} | {times(r['itl_p99_vs_whole'])} | "
                     f"{number(r['running_tokens_per_s'], 2)} | {number(ttft['p50'])} | {number(ttft['max'])} | "
                     f"{times(r['ttft_p50_vs_whole'])} | {number(r['window_s'], 1)} |")
    return "\n".join(lines)
