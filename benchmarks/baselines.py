"""Same-run baselines and targets of ``mofserve bench load``.

**Baselines** (``--baseline eager eager-bf16 exported``): before the sweep, in the benchmark's own
process (the server idles meanwhile), the pipelines of ``benchmarks/pipelines.py`` answer the same
question on the sweep's first images (which the sweep then sends as its first fresh requests), with
modes drawn from the same mix, one request at a time, after one untimed request per mode.

**Targets**, each with MET / MISSED (``None`` where a side was not measured) and the profile it was
set for (issue 4 and issue 12; a verdict on another profile is shown, marked as such):

* ``throughput_vs_eager`` (small): serving throughput at the best concurrency >= 2x eager fp32's;
* ``p50_c1`` (small): p50 at concurrency 1, fresh images, <= 1.15x the exported in-process p50;
* ``throughput_c4_vs_c1`` (small): throughput at concurrency 4 >= at concurrency 1;
* ``decode_scaling`` (paper-shaped): LLM decode tokens/s with 8 concurrent streams >= 3.5x one
  stream's (``stats.decode_figures``: tokens after each stream's first over the time any stream was
  decoding, less the prefills the engine ran meanwhile); ``decode_scaling_with_prefills``: the same
  bar over the whole time any stream was decoding (a stricter reading: every joining request's
  prefill stalls all running streams);
* ``ttft_c1`` (paper-shaped): time to first token p50 at concurrency 1, fresh images, <= 1.1x the
  exported in-process path to the first token (the same engine, in process).

Ratios without a target: serving / exported and serving / eager-bf16 throughput (the latter what
bf16 alone would give a user), the all-request p50 at c=1 over the exported p50.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np

from mofserve.core.machine import cpu_snapshot, cpu_usage_since
from mofserve.core.profiles import get_profile

from .pipelines import EagerBf16Pipeline, EagerPipeline, InProcessPipeline
from .stats import latency_summary, sample_modes, stage_means
from .workload import Progress

BASELINES = ("eager", "eager-bf16", "exported")
DEFAULT_BASELINE_REQUESTS = 8
THROUGHPUT_TARGET = 2.0  # serving throughput at the best concurrency >= 2x the naive eager baseline's
P50_TARGET = 1.15  # p50 at concurrency 1 (fresh images) <= 1.15x the exported in-process pipeline's p50
C4_TARGET = 1.0  # small: throughput at concurrency 4 >= at concurrency 1
DECODE_SCALING_TARGET = 3.5  # paper-shaped: decode tokens/s at 8 streams >= 3.5x at 1
DECODE_STREAMS = 8
TTFT_TARGET = 1.10  # paper-shaped: TTFT p50 at c=1 <= 1.1x the in-process path to the first token


def baseline_plan(config, count: int | None = None) -> list[tuple[int, str]]:
    """(image index, mode) of each baseline request: the pool's first images, which the sweep then
    sends as its first fresh images, and modes drawn from the sweep's mix (own seeded stream)."""
    n = config.baseline_requests if count is None else count
    modes = sample_modes(config.mix, n, np.random.default_rng([config.seed, 2]))
    return [(i, str(mode)) for i, mode in enumerate(modes)]


def load_pipeline(name: str, profile_name: str):
    from mofserve.core.checkpoints import resolve_profile  # lazy: core.checkpoints imports torch
    from mofserve.export.pipeline import export_profile  # lazy: export imports torch (and tritonclient's protobufs)

    profile = get_profile(profile_name)
    if name == "eager":
        return EagerPipeline(profile, resolve_profile(profile))
    if name == "eager-bf16":
        return EagerBf16Pipeline(profile, resolve_profile(profile))
    return InProcessPipeline(export_profile(profile, target="cpu", log=lambda m: None))


def run_baseline(name: str, config, images, profile_name: str, progress=None) -> dict:
    """One baseline: load it, answer one untimed request per mode, then the plan's requests one at a
    time (wall time per request; throughput = requests / total time). torch's thread count is put
    back afterwards (the exported pipeline sets the LM's, as the served model does)."""
    import gc

    import torch

    progress = progress or Progress(config.progress)
    plan = baseline_plan(config)
    images.ensure(len(plan) + 1)
    threads = torch.get_num_threads()
    pipeline = None
    try:
        t0 = time.perf_counter()
        pipeline = load_pipeline(name, profile_name)
        load_s = time.perf_counter() - t0
        warm_image = images[len(plan)]  # not among the timed ones
        for mode in dict.fromkeys(m for _, m in plan):
            pipeline.answer(warm_image, mode, config.question, config.options, config.max_new_tokens)
        records = []
        cpu_before = cpu_snapshot()
        t0 = time.perf_counter()
        for index, mode in plan:
            started = time.perf_counter()
            answer, stages = pipeline.answer(images[index], mode, config.question, config.options,
                                             config.max_new_tokens)
            records.append({"image": index, "mode": mode, "ms": (time.perf_counter() - started) * 1e3,
                            "stages": stages, "chosen": answer.chosen_option, "answer": answer.text,
                            "completion_tokens": answer.completion_tokens})
            progress.show(f"baseline {name}: {len(records)}/{len(plan)} requests")
        elapsed = time.perf_counter() - t0
        cpu = cpu_usage_since(cpu_before)
        label, runtime, precision = pipeline.label, pipeline.runtime, pipeline.precision
    finally:
        if pipeline is not None:
            pipeline.close()
        del pipeline
        gc.collect()
        torch.set_num_threads(threads)
    latency = latency_summary([r["ms"] for r in records])
    ttft = [r["stages"]["ttft_ms"] for r in records if math.isfinite(r["stages"].get("ttft_ms", math.nan))]
    tokens = sum(r["completion_tokens"] for r in records)
    progress.show(f"baseline {name} ({label}): {len(records) / elapsed:.2f} req/s, p50 {latency['p50']:.1f} ms",
                  final=True)
    return {"name": name, "label": label, "runtime": runtime, "precision": precision, "profile": profile_name,
            "load_s": load_s, "requests": len(records), "elapsed_s": elapsed,
            "throughput_rps": len(records) / elapsed if elapsed > 0 else math.nan, "latency_ms": latency,
            "ttft_ms": latency_summary(ttft), "output_tokens": tokens,
            "output_tokens_per_s": tokens / elapsed if elapsed > 0 else math.nan,
            "stages_ms": _stage_means(r["stages"] for r in records), "records": records,
            "cpu": cpu}


def _stage_means(rows) -> dict[str, float]:
    rows = list(rows)
    means = stage_means(rows)
    for key in ("ttft_ms", "llm_queue_ms", "prefill_ms", "decode_ms"):
        values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
        if values:
            means[key] = float(np.mean(values))
    return means


def run_baselines(config, images, profile_name: str) -> dict[str, dict]:
    return {name: run_baseline(name, config, images, profile_name) for name in config.baselines}


# --------------------------------------------------------------------------------------------
# Ratios and targets


def _ratio(numerator: float | None, denominator: float | None) -> float:
    if numerator is None or denominator is None or not denominator > 0 or not math.isfinite(numerator):
        return math.nan
    return numerator / denominator


def verdict(value: float, target: float, at_least: bool) -> str | None:
    if value is None or not math.isfinite(value):
        return None
    return "MET" if (value >= target if at_least else value <= target) else "MISSED"


def _closed(points: Sequence[Mapping]) -> list[Mapping]:
    return [p for p in points if p["kind"] == "concurrency" and p["ok"] > 0]


def _at(points: Sequence[Mapping], concurrency: int) -> Mapping | None:
    return next((p for p in _closed(points) if p["value"] == concurrency), None)


def baseline_ratios(baselines: Mapping[str, Mapping], points: Sequence[Mapping]) -> dict:
    """The same-run ratios against the baselines with MET / MISSED (None where a side is missing):

    * ``throughput``: serving throughput at the best concurrency / the eager baseline's (>= 2x);
    * ``p50_c1``: p50 at concurrency 1 of the FRESH images (a repeated image skips the encoders, the
      in-process pipeline has no cache) / the exported in-process pipeline's p50 (<= 1.15x);
    * ``ttft_c1``: the same for the time to first token (streamed requests) over the exported
      pipeline's path to its first token (<= 1.1x);
    plus, for reading them, serving / exported and serving / eager-bf16 throughput and the
    all-request p50 ratio."""
    best = max(_closed(points), key=lambda p: p["throughput_rps"], default=None)
    c1 = _at(points, 1)
    fresh_c1 = [r for r in (c1 or {}).get("records", ()) if r["ok"] and not r["repeated"]]
    eager, exported, bf16 = (baselines.get(k) for k in ("eager", "exported", "eager-bf16"))
    serving_rps = best["throughput_rps"] if best else None
    throughput = _ratio(serving_rps, eager["throughput_rps"] if eager else None)
    p50_fresh = latency_summary([r["ms"] for r in fresh_c1])["p50"] if fresh_c1 else math.nan
    p50 = _ratio(p50_fresh, exported["latency_ms"]["p50"] if exported else None)
    ttfts = [r["ttft_ms"] for r in fresh_c1 if r.get("ttft_ms") is not None]
    ttft_fresh = latency_summary(ttfts)["p50"] if ttfts else math.nan
    exported_ttft = ((exported.get("ttft_ms") or {}).get("p50") if exported else None)
    ttft = _ratio(ttft_fresh, exported_ttft if exported_ttft is not None and math.isfinite(exported_ttft) else None)
    return {
        "throughput": {"value": throughput, "target": THROUGHPUT_TARGET, "at_least": True,
                       "verdict": verdict(throughput, THROUGHPUT_TARGET, True), "serving_rps": serving_rps,
                       "best_concurrency": best["value"] if best else None,
                       "eager_rps": eager["throughput_rps"] if eager else None},
        "p50_c1": {"value": p50, "target": P50_TARGET, "at_least": False, "verdict": verdict(p50, P50_TARGET, False),
                   "serving_p50_ms": p50_fresh, "fresh_requests": len(fresh_c1),
                   "exported_p50_ms": exported["latency_ms"]["p50"] if exported else None},
        "ttft_c1": {"value": ttft, "target": TTFT_TARGET, "at_least": False,
                    "verdict": verdict(ttft, TTFT_TARGET, False), "serving_ttft_p50_ms": ttft_fresh,
                    "streamed_requests": len(ttfts), "exported_ttft_p50_ms": exported_ttft},
        "throughput_vs_exported": _ratio(serving_rps, exported["throughput_rps"] if exported else None),
        "throughput_vs_eager_bf16": _ratio(serving_rps, bf16["throughput_rps"] if bf16 else None),
        "p50_c1_all_vs_exported": _ratio(c1["latency_ms"]["p50"] if c1 else None,
                                         exported["latency_ms"]["p50"] if exported else None),
    }


def point_targets(points: Sequence[Mapping]) -> dict:
    """The targets that need only the sweep's points: ``throughput_c4_vs_c1`` and ``decode_scaling``."""
    c1, c4, c8 = _at(points, 1), _at(points, 4), _at(points, DECODE_STREAMS)
    c4_ratio = _ratio(c4["throughput_rps"] if c4 else None, c1["throughput_rps"] if c1 else None)

    def decode(point, key="decode_tokens_per_s"):
        return ((point or {}).get("tokens") or {}).get(key)

    scaling = _ratio(decode(c8), decode(c1))
    key = "decode_tokens_per_s_with_prefills"
    strict = _ratio(decode(c8, key), decode(c1, key))
    return {
        "throughput_c4_vs_c1": {"value": c4_ratio, "target": C4_TARGET, "at_least": True,
                                "verdict": verdict(c4_ratio, C4_TARGET, True),
                                "c1_rps": c1["throughput_rps"] if c1 else None,
                                "c4_rps": c4["throughput_rps"] if c4 else None},
        "decode_scaling": {"value": scaling, "target": DECODE_SCALING_TARGET, "at_least": True,
                           "verdict": verdict(scaling, DECODE_SCALING_TARGET, True), "c1_decode_tps": decode(c1),
                           "c8_decode_tps": decode(c8),
                           "c8_decode_concurrency": ((c8 or {}).get("tokens") or {}).get("decode_concurrency")},
        "decode_scaling_with_prefills": {"value": strict, "target": DECODE_SCALING_TARGET, "at_least": True,
                                         "verdict": verdict(strict, DECODE_SCALING_TARGET, True),
                                         "c1_decode_tps": decode(c1, key), "c8_decode_tps": decode(c8, key)},
    }


# (key, where it lives, the profile it was set for, what it says)
TARGETS = (
    ("throughput", "ratios", "small", "serving throughput at the best concurrency / eager fp32 in-process"),
    ("p50_c1", "ratios", "small", "p50 at c=1 (fresh images) / exported in-process p50"),
    ("throughput_c4_vs_c1", "points", "small", "throughput at c=4 / at c=1"),
    ("decode_scaling", "points", "paper-shaped",
     f"LLM decode tokens/s with {DECODE_STREAMS} streams / with 1 (through the server; decode steps: the "
     "prefills of joining requests taken out)"),
    ("decode_scaling_with_prefills", "points", "paper-shaped",
     f"the same, stricter: decode tokens/s with {DECODE_STREAMS} streams / with 1 over all the time any stream was "
     "decoding (joining requests' prefills included)"),
    ("ttft_c1", "ratios", "paper-shaped", "TTFT p50 at c=1 (fresh images) / in-process path to the first token"),
)


def target_rows(ratios: Mapping | None, points_targets: Mapping, profile: str | None) -> list[dict]:
    """One row per target that this run measured (both sides present), in TARGETS' order."""
    rows = []
    for key, home, set_for, what in TARGETS:
        entry = (ratios or {}).get(key) if home == "ratios" else points_targets.get(key)
        if not entry or entry.get("verdict") is None:
            continue
        rows.append({"key": key, "what": what, "value": entry["value"], "target": entry["target"],
                     "at_least": entry["at_least"], "verdict": entry["verdict"], "set_for": set_for,
                     "this_profile": profile == set_for})
    return rows
