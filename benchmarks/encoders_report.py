"""What ``mofserve bench encoders`` reports, apart from how it measures: the result row
(:class:`Measurement`), the recommendation (the fastest runtime whose features stay close to
PyTorch fp32) and the Markdown tables and lines it prints.

It exists so that :mod:`mofserve.benchmarks.encoders` holds the measuring and the command only;
everything here is pure (no model, no runtime, no torch) and unit-tested on made-up rows. It
imports nothing of ``encoders``, which imports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .flops import VitShape

ACCEPTABLE_COSINE = 0.999
# The runtime every cosine and speed-up is taken against (the first of encoders.RUNTIME_SPECS).
REFERENCE = "pytorch-fp32"

# What ServingSpec.runtime puts in the cpu repository (export/repository.py): ONNX Runtime runs
# fp32, OpenVINO is configured with precision bf16. Other runtimes here are baselines only.
SERVABLE = {"onnxruntime": "onnxruntime-fp32", "openvino": "openvino-bf16"}


@dataclass(frozen=True)
class Measurement:
    """One runtime x encoder x batch size."""

    runtime: str
    precision: str
    encoder: str
    batch: int
    runs: int
    median_ms: float  # per image
    min_ms: float  # per image
    gflops_per_s: float  # from min_ms (best of runs, like the ceiling)
    share_of_ceiling: float  # gflops_per_s / the matmul ceiling of ``precision``
    min_cosine: float  # patch-token features vs PyTorch fp32, min over token rows
    min_cosine_pooled: float  # the pooled output (CLIP image_embeds / DINOv2 CLS)
    times_ms: tuple[float, ...] = ()  # per image, each timed run in order (for pooling several reports)


def combined_latency(results: Iterable[Measurement]) -> dict[tuple[str, int], dict[str, float]]:
    """Per (runtime, batch): both encoders' median ms/image summed (one image needs both) and
    the worst token / pooled cosine of the two."""
    out: dict[tuple[str, int], dict[str, float]] = {}
    for m in results:
        slot = out.setdefault((m.runtime, m.batch), {"median_ms": 0.0, "min_ms": 0.0, "min_cosine": 1.0,
                                                     "min_cosine_pooled": 1.0, "encoders": 0})
        slot["median_ms"] += m.median_ms
        slot["min_ms"] += m.min_ms
        slot["min_cosine"] = min(slot["min_cosine"], m.min_cosine)
        slot["min_cosine_pooled"] = min(slot["min_cosine_pooled"], m.min_cosine_pooled)
        slot["encoders"] += 1
    return out


def recommend(results: Sequence[Measurement], min_cosine: float = ACCEPTABLE_COSINE,
              candidates: Iterable[str] | None = None) -> dict:
    """The fastest runtime whose token features stay at ``min_cosine`` or above.

    Speed is the median ms/image of CLIP + DINOv2 together. Per batch size the winner is the
    fastest acceptable runtime; overall it is the runtime acceptable at every batch size with the
    lowest sum of those per-image times (each batch size weighs the same). ``candidates`` limits
    the choice (e.g. to the servable runtimes).
    """
    allowed = set(candidates) if candidates is not None else None
    combined = {k: v for k, v in combined_latency(results).items() if allowed is None or k[0] in allowed}
    encoders = max((v["encoders"] for v in combined.values()), default=0)
    batches = sorted({b for _, b in combined})
    runtimes = sorted({r for r, _ in combined})

    def ok(runtime: str, batch: int) -> bool:
        v = combined.get((runtime, batch))
        return v is not None and v["encoders"] == encoders and v["min_cosine"] >= min_cosine

    per_batch = {}
    for b in batches:
        ranked = sorted((combined[(r, b)]["median_ms"], r) for r in runtimes if ok(r, b))
        per_batch[b] = {"runtime": ranked[0][1], "median_ms": ranked[0][0]} if ranked else None
    totals = {r: sum(combined[(r, b)]["median_ms"] for b in batches) for r in runtimes
              if all(ok(r, b) for b in batches)}
    best = min(totals, key=totals.__getitem__) if totals else None
    rejected = sorted(r for r in runtimes if not all(ok(r, b) for b in batches))
    return {"runtime": best, "per_batch": per_batch, "total_median_ms": totals, "rejected": rejected,
            "min_cosine": min_cosine}


def _fmt_cos(value: float) -> str:
    return f"{value:.6f}"


def format_table(results: Sequence[Measurement]) -> str:
    """Markdown: one row per runtime x encoder x batch, in the order measured."""
    lines = [
        "| runtime | encoder | batch | ms/image median | ms/image min | GFLOP/s (best) | share of ceiling "
        "| min cos tokens | min cos pooled |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results:
        lines.append(f"| {m.runtime} | {m.encoder} | {m.batch} | {m.median_ms:.1f} | {m.min_ms:.1f} | "
                     f"{m.gflops_per_s:.1f} | {100 * m.share_of_ceiling:.1f}% | {_fmt_cos(m.min_cosine)} | "
                     f"{_fmt_cos(m.min_cosine_pooled)} |")
    return "\n".join(lines)


def format_combined_table(results: Sequence[Measurement], reference: str = REFERENCE) -> str:
    """Markdown: CLIP + DINOv2 per image, per runtime and batch, with the speed-up over ``reference``."""
    combined = combined_latency(results)
    lines = ["| runtime | batch | CLIP+DINOv2 ms/image median | speed-up vs " + reference + " | worst min cos tokens |",
             "|---|---:|---:|---:|---:|"]
    for (runtime, batch), v in combined.items():
        ref = combined.get((reference, batch))
        speedup = f"{ref['median_ms'] / v['median_ms']:.2f}x" if ref else "-"
        lines.append(f"| {runtime} | {batch} | {v['median_ms']:.1f} | {speedup} | {_fmt_cos(v['min_cosine'])} |")
    return "\n".join(lines)


def format_recommendation(results: Sequence[Measurement], min_cosine: float = ACCEPTABLE_COSINE) -> str:
    overall = recommend(results, min_cosine)
    servable = recommend(results, min_cosine, candidates=SERVABLE.values())
    combined = combined_latency(results)

    def describe(rec: dict) -> str:
        if rec["runtime"] is None:
            return "none acceptable"
        parts = [f"{combined[(rec['runtime'], b)]['median_ms']:.1f} ms/image at batch {b}"
                 for b in sorted(rec["per_batch"])]
        return f"{rec['runtime']} (CLIP+DINOv2 {', '.join(parts)})"

    serving_name = {v: k for k, v in SERVABLE.items()}.get(servable["runtime"] or "", "?")
    line = (f"Recommendation: fastest at min token cosine >= {min_cosine}: {describe(overall)}; "
            f"among what the cpu repository can serve (ServingSpec.runtime onnxruntime = fp32, "
            f"openvino = bf16): {describe(servable)} -> ServingSpec.runtime = {serving_name!r}.")
    if overall["rejected"]:
        line += f" Rejected on cosine: {', '.join(overall['rejected'])}."
    return line


def format_ceilings(by_size: Mapping[str, Mapping[int, float]], threads: int) -> str:
    parts = []
    for precision, rates in by_size.items():
        sizes = ", ".join(f"{n}: {r:.0f}" for n, r in sorted(rates.items()))
        parts.append(f"{precision} {max(rates.values()):.1f} GFLOP/s (by size {sizes})")
    return f"torch.matmul ceiling, {threads} threads, best of runs: " + "; ".join(parts)


def format_flops(encoders: Mapping[str, Mapping]) -> str:
    """The FLOPs-per-image line, from each encoder's ``flops_per_image`` and ``shape`` (a
    :class:`VitShape` as a dict)."""
    return "FLOPs per image (matmuls, 2 per MAC): " + ", ".join(
        f"{name} {info['flops_per_image'] / 1e9:.2f} GFLOPs ({VitShape(**info['shape']).tokens} tokens)"
        for name, info in encoders.items())


def format_load(load: Sequence[float], cpus: int | None) -> str:
    """The 1-min load average at the start and after each encoder, flagged when other processes
    were competing for the ``cpus``."""
    return (f"1-min load average at start / after each encoder: {' / '.join(f'{x:.1f}' for x in load)} "
            f"on {cpus} CPUs" + (" (other processes were competing: numbers are noisy)"
                                 if max(load) > 1.25 * (cpus or 1) else ""))
