"""``mofserve bench encoders``: encoder latency per CPU runtime against the machine's matmul ceiling.

One run on a profile measures, for the exact export wrappers that are served (``ClipVisionFeatures``,
``Dinov2Features``):

* ms per image at each batch size for PyTorch eager fp32, PyTorch eager bf16 (``torch.autocast``),
  ONNX Runtime fp32, OpenVINO fp32 and OpenVINO bf16 (the last three through ``OnnxRunner`` on the
  graph ``export_vision`` builds and parity-checks). Warm-up runs are excluded; the runtimes are
  interleaved round by round so that load from other processes hits them alike; median and min
  over the timed runs are reported.
* the fp32 and bf16 ``torch.matmul`` rate of this machine (best of several runs, square sizes),
  measured at the start and at the end of the run;
* each encoder's FLOPs per image from its config (:mod:`mofserve.benchmarks.flops`) and the
  achieved FLOP/s as a share of the ceiling of the runtime's precision;
* the min over token rows of the cosine of each runtime's outputs against PyTorch fp32 on real
  photos (scikit-image's, through the serving preprocessing).

It prints a Markdown table and a recommendation, and writes a JSON report when asked. The pure
helpers (stats, ceilings, shares here; table, recommendation in :mod:`.encoders_report`) are
unit-tested without any model.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mofserve.core.logs import configure_logging
from mofserve.core.machine import git_commit, load_average
from mofserve.core.machine import machine_info as core_machine_info
from mofserve.core.preprocessing import preprocess_bytes
from mofserve.core.profiles import Profile, add_profile_arguments, get_profile, profile_from_args
from mofserve.core.reports import write_json
from mofserve.core.runtime import OnnxRunner
from mofserve.core.samples import SAMPLE_PHOTOS, sample_photos

from .encoders_report import (
    ACCEPTABLE_COSINE,
    REFERENCE,
    SERVABLE,
    Measurement,
    format_ceilings,
    format_combined_table,
    format_flops,
    format_load,
    format_recommendation,
    format_table,
    recommend,
)
from .flops import vit_flops, vit_macs_breakdown, vit_shape_from_config

_logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
MATMUL_SIZES = (1024, 2048, 4096)
MATMUL_RUNS = 3
SWITCH_PAUSE_S = 0.05  # idle gap between runs, so one runtime's spinning threads don't tax the next


@dataclass(frozen=True)
class RuntimeSpec:
    engine: str  # "pytorch", "onnxruntime" or "openvino"
    precision: str  # "fp32" or "bf16"

    @property
    def label(self) -> str:
        return f"{self.engine}-{self.precision}"


RUNTIME_SPECS = (
    RuntimeSpec("pytorch", "fp32"),  # REFERENCE (encoders_report): what the cosines are taken against
    RuntimeSpec("pytorch", "bf16"),
    RuntimeSpec("onnxruntime", "fp32"),
    RuntimeSpec("openvino", "fp32"),
    RuntimeSpec("openvino", "bf16"),
)
# --------------------------------------------------------------------------------------------
# Pure helpers


def repeats_for_batch(repeats: int, batch: int, min_runs: int = 3) -> int:
    """Timed runs at ``batch``: ``repeats`` at batch 1, fewer for large batches (about
    ``4 * repeats`` images per runtime), never fewer than ``min(repeats, min_runs)``."""
    if repeats < 1 or batch < 1:
        raise ValueError(f"repeats and batch must be positive, got repeats={repeats}, batch={batch}")
    wanted = math.ceil(4 * repeats / batch)
    return max(min(repeats, min_runs), min(repeats, wanted))


def per_image_stats(seconds: Sequence[float], batch: int) -> dict[str, float]:
    """Median and min milliseconds per image over runs that each processed ``batch`` images."""
    if not seconds:
        raise ValueError("per_image_stats: no timed runs")
    per_image = [1000.0 * s / batch for s in seconds]
    return {"median_ms": statistics.median(per_image), "min_ms": min(per_image), "runs": len(per_image)}


def gflops_per_second(flops_per_image: float, ms_per_image: float) -> float:
    return flops_per_image / (ms_per_image * 1e-3) / 1e9


def matmul_gflops(n: int, seconds: float) -> float:
    """Rate of one ``[n, n] x [n, n]`` matmul (2 n^3 FLOPs) that took ``seconds``."""
    return 2.0 * n**3 / seconds / 1e9


def ceiling_for(precision: str, ceilings: Mapping[str, float]) -> float:
    """The matmul ceiling (GFLOP/s) a runtime of ``precision`` is compared with: fp32 runtimes
    against the fp32 rate, bf16 ones against the bf16 rate."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision not in ceilings:
        raise KeyError(f"no {precision} matmul ceiling was measured")
    return float(ceilings[precision])


def share_of_ceiling(flops_per_image: float, ms_per_image: float, precision: str,
                     ceilings: Mapping[str, float]) -> float:
    return gflops_per_second(flops_per_image, ms_per_image) / ceiling_for(precision, ceilings)


def best_ceilings(*measured: Mapping[str, Mapping[int, float]]) -> dict[str, dict[int, float]]:
    """Merge several ceiling measurements ({precision: {size: GFLOP/s}}), keeping the best per size."""
    merged: dict[str, dict[int, float]] = {}
    for m in measured:
        for precision, by_size in m.items():
            slot = merged.setdefault(precision, {})
            for size, rate in by_size.items():
                slot[int(size)] = max(slot.get(int(size), 0.0), float(rate))
    return merged


def ceiling_summary(by_size: Mapping[str, Mapping[int, float]]) -> dict[str, float]:
    """{precision: best GFLOP/s over sizes}."""
    return {precision: max(rates.values()) for precision, rates in by_size.items() if rates}


def min_row_cosine(ref: np.ndarray, got: np.ndarray) -> float:
    """Min over rows (last axis = features) of the cosine of ``got`` against ``ref``."""
    if ref.shape != got.shape:
        raise ValueError(f"shape {got.shape} differs from the reference's {ref.shape}")
    a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    b = got.reshape(-1, got.shape[-1]).astype(np.float64)
    denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(np.min(np.sum(a * b, axis=1) / denom))


def photo_batch(photos: Sequence[np.ndarray], batch: int) -> np.ndarray:
    """``batch`` images cycling through ``photos`` (so batch 8 holds every one of 6 photos)."""
    if not photos:
        raise ValueError("photo_batch: no photos")
    return np.ascontiguousarray(np.stack([photos[i % len(photos)] for i in range(batch)]).astype(np.float32))


def measurement(spec: RuntimeSpec, encoder: str, batch: int, seconds: Sequence[float], flops_per_image: float,
                ceilings: Mapping[str, float], min_cosine: float, min_cosine_pooled: float) -> Measurement:
    stats = per_image_stats(seconds, batch)
    rate = gflops_per_second(flops_per_image, stats["min_ms"])
    return Measurement(spec.label, spec.precision, encoder, batch, int(stats["runs"]), stats["median_ms"],
                       stats["min_ms"], rate, rate / ceiling_for(spec.precision, ceilings), min_cosine,
                       min_cosine_pooled, tuple(round(1000.0 * t / batch, 3) for t in seconds))


# --------------------------------------------------------------------------------------------
# Machine


def machine_info() -> dict:
    import onnxruntime
    import openvino
    import torch
    import transformers

    return {
        **core_machine_info(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.__version__,
        "numpy": np.__version__,
    }


# --------------------------------------------------------------------------------------------
# Measurement


def measure_matmul(sizes: Sequence[int] = MATMUL_SIZES, runs: int = MATMUL_RUNS,
                   precisions: Sequence[str] = PRECISIONS) -> dict[str, dict[int, float]]:
    """Best GFLOP/s of ``torch.matmul`` on square matrices, per precision and size (torch's threads)."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    out: dict[str, dict[int, float]] = {}
    generator = torch.Generator().manual_seed(0)
    for precision in precisions:
        out[precision] = {}
        for n in sizes:
            a = torch.randn(n, n, generator=generator).to(dtypes[precision])
            b = torch.randn(n, n, generator=generator).to(dtypes[precision])
            torch.matmul(a, b)  # warm-up
            best = math.inf
            for _ in range(runs):
                start = time.perf_counter()
                torch.matmul(a, b)
                best = min(best, time.perf_counter() - start)
            out[precision][n] = matmul_gflops(n, best)
    return out


Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _torch_runner(module, precision: str) -> Runner:
    import torch

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            x = torch.from_numpy(batch)
            if precision == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    outputs = module(x)
            else:
                outputs = module(x)
        return tuple(o.float().numpy() for o in outputs)  # type: ignore[return-value]

    return run


def _onnx_runner(graph: Path, spec: RuntimeSpec, input_name: str, output_names: Sequence[str],
                 threads: int) -> Runner:
    runner = OnnxRunner(graph, runtime=spec.engine, threads=threads, precision=spec.precision)

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = runner.run({input_name: batch})
        return tuple(out[name] for name in output_names)  # type: ignore[return-value]

    return run


def time_interleaved(runners: Mapping[str, Runner], batch: np.ndarray, runs: int, warmup: int,
                     pause_s: float = SWITCH_PAUSE_S) -> tuple[dict[str, list[float]], dict[str, tuple]]:
    """Seconds per call for each runner, one call of each per round (order rotated each round),
    after ``warmup`` untimed calls; also the last outputs of each runner."""
    labels = list(runners)
    outputs: dict[str, tuple] = {}
    for label in labels:
        for _ in range(warmup):
            outputs[label] = runners[label](batch)
        time.sleep(pause_s)
    seconds: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(runs):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            start = time.perf_counter()
            outputs[label] = runners[label](batch)
            seconds[label].append(time.perf_counter() - start)
            time.sleep(pause_s)
    return seconds, outputs


def _encoder_label(model_name: str) -> str:
    return {"clip_vision": "clip", "dinov2_vision": "dinov2"}.get(model_name, model_name)


def bench_encoder(config, paths, profile, photos: Sequence[np.ndarray], batch_sizes: Sequence[int], repeats: int,
                  ceilings: Mapping[str, float], specs: Sequence[RuntimeSpec] = RUNTIME_SPECS,
                  threads: int = 0) -> tuple[list[Measurement], dict]:
    from mofserve.export.onnx_export import export_vision  # lazy: export imports torch (and tritonclient's protobufs)

    encoder = _encoder_label(config.model_name)
    graph = export_vision(config, paths, profile, log=lambda m: _logger.info(f"export {m}"))
    module = config.build_module(paths, profile)
    shape = vit_shape_from_config(module.model.config, profile.image_size)
    flops = vit_flops(shape)
    info = {"model": config.model_name, "graph": str(graph.graph), "shape": asdict(shape),
            "flops_per_image": flops, "macs_breakdown": vit_macs_breakdown(shape),
            "export_parity_min_cosine": graph.manifest["parity"]["min_cosine"]}
    _logger.info(f"{encoder}: {shape.tokens} tokens x {shape.num_layers} layers, width {shape.hidden_size} -> "
                 f"{flops / 1e9:.2f} GFLOPs/image")
    runners: dict[str, Runner] = {}
    for spec in specs:
        if spec.engine == "pytorch":
            runners[spec.label] = _torch_runner(module, spec.precision)
        else:
            started = time.perf_counter()
            runners[spec.label] = _onnx_runner(graph.graph, spec, config.input_name, config.output_names, threads)
            _logger.info(f"{encoder}: {spec.label} compiled in {time.perf_counter() - started:.1f} s")
    results = []
    for batch_size in batch_sizes:
        batch = photo_batch(photos, batch_size)
        runs = repeats_for_batch(repeats, batch_size)
        started = time.perf_counter()
        seconds, outputs = time_interleaved(runners, batch, runs, warmup=2 if batch_size == 1 else 1)
        ref = outputs[REFERENCE] if REFERENCE in outputs else _torch_runner(module, "fp32")(batch)
        for spec in specs:
            got = outputs[spec.label]
            m = measurement(spec, encoder, batch_size, seconds[spec.label], flops, ceilings,
                            min_row_cosine(ref[0], got[0]), min_row_cosine(ref[1], got[1]))
            results.append(m)
            _logger.info(f"{encoder} batch {batch_size} {spec.label:<16} median {m.median_ms:7.1f} ms/image, "
                         f"min {m.min_ms:7.1f}, {m.gflops_per_s:6.1f} GFLOP/s ({100 * m.share_of_ceiling:4.1f}% of "
                         f"{spec.precision} ceiling), min cos {m.min_cosine:.6f}")
        _logger.info(f"{encoder} batch {batch_size}: {runs} rounds in {time.perf_counter() - started:.1f} s")
    del runners, module
    return results, info


def main(profile=None, batch_sizes: Sequence[int] = (1, 8), repeats: int = 5, output: Path | str | None = None,
         threads: int | None = None) -> int:
    """Run the benchmark on ``profile`` (a Profile or a name; default ``small``), print the table and the
    recommendation, and write the JSON report to ``output`` if given. ``threads`` defaults to the
    profile's ``ServingSpec.intra_op_threads`` (0: each runtime's default, all cores)."""
    import torch

    from mofserve.core.checkpoints import resolve_profile  # lazy: core.checkpoints imports torch
    from mofserve.export.configs import VISION_EXPORTS  # lazy: export imports torch (and tritonclient's protobufs)

    if profile is None or isinstance(profile, str):
        profile = get_profile(profile or "small")
    assert isinstance(profile, Profile)
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not batch_sizes or batch_sizes[0] < 1 or repeats < 1:
        raise ValueError("bench encoders: batch sizes and repeats must be positive")
    threads = profile.serving.intra_op_threads if threads is None else threads
    started = time.perf_counter()
    machine = machine_info()
    _logger.info(f"{machine['cpu_model']} ({machine['usable_cpus']} usable CPUs, "
                 f"flags {' '.join(machine['cpu_flags'])}); torch {machine['torch']} "
                 f"({machine['torch_threads']} threads), onnxruntime {machine['onnxruntime']}, "
                 f"openvino {machine['openvino']}")
    if profile.random_weights:
        _logger.info(f"profile {profile.name}: seeded random weights "
                     "(the speeds are real, the features are not meaningful)")

    _logger.info("matmul ceiling (start)")
    first = measure_matmul()
    paths = resolve_profile(profile)
    photos = [preprocess_bytes(b, profile.image_size, aspect=profile.aspect) for b in sample_photos()]
    ceilings = ceiling_summary(first)  # provisional; the final table uses the best of all ceiling runs

    results: list[Measurement] = []
    encoders: dict[str, dict] = {}
    ceiling_runs = [first]
    load = [load_average()[0]]
    for step, config in enumerate(VISION_EXPORTS):
        if step:
            _logger.info("matmul ceiling (between encoders)")
            ceiling_runs.append(measure_matmul())
        got, info = bench_encoder(config, paths, profile, photos, batch_sizes, repeats, ceilings, threads=threads)
        results.extend(got)
        encoders[_encoder_label(config.model_name)] = info
        load.append(load_average()[0])

    _logger.info("matmul ceiling (end)")
    ceiling_runs.append(measure_matmul())
    by_size = best_ceilings(*ceiling_runs)
    ceilings = ceiling_summary(by_size)
    flops = {name: info["flops_per_image"] for name, info in encoders.items()}
    results = [_rescore(m, flops[m.encoder], ceilings) for m in results]

    ceiling_line = format_ceilings(by_size, torch.get_num_threads())
    flops_line = format_flops(encoders)
    recommendation = format_recommendation(results)
    print(f"\n## Encoders per runtime (CPU): profile {profile.name}, {profile.image_size}px, "
          f"{machine['cpu_model']}, {machine['usable_cpus']} CPUs\n")
    print(ceiling_line)
    print(flops_line)
    print("GFLOP/s and share use the best run (like the ceiling); cosines are against pytorch-fp32 on "
          f"{len(photos)} photos, min over token rows.")
    print(format_load(load, machine["usable_cpus"]) + "\n")
    print(format_table(results))
    print()
    print(format_combined_table(results))
    print()
    print(recommendation)
    elapsed = time.perf_counter() - started
    _logger.info(f"done in {elapsed:.0f} s")

    if output is not None:
        report = {
            "benchmark": "encoders",
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "machine": machine,
            "profile": profile.name,
            "random_weights": profile.random_weights,
            "image_size": profile.image_size,
            "batch_sizes": batch_sizes,
            "repeats": repeats,
            "runs_per_batch": {b: repeats_for_batch(repeats, b) for b in batch_sizes},
            "threads": threads,
            "photos": list(SAMPLE_PHOTOS),
            "acceptable_cosine": ACCEPTABLE_COSINE,
            "load_average_1min": load,
            "ceilings_gflops": ceilings,
            "ceilings_by_size_gflops": by_size,
            "encoders": encoders,
            "results": [asdict(m) for m in results],
            "recommendation": recommend(results),
            "recommendation_servable": recommend(results, candidates=SERVABLE.values()),
            "recommendation_line": recommendation,
            "seconds": round(elapsed, 1),
        }
        write_json(output, report)
        _logger.info(f"report -> {output}")
    return 0


def _rescore(m: Measurement, flops_per_image: float, ceilings: Mapping[str, float]) -> Measurement:
    """``m`` with its share recomputed against final ``ceilings``."""
    rate = gflops_per_second(flops_per_image, m.min_ms)
    return Measurement(**{**asdict(m), "gflops_per_s": rate,
                          "share_of_ceiling": rate / ceiling_for(m.precision, ceilings)})


def arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mofserve bench encoders`` (profile ``small`` by default: tiny's encoders are too
    small for a latency that means anything)."""
    add_profile_arguments(parser)
    parser.set_defaults(profile="small")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, help="write the JSON report here")


def run(args: argparse.Namespace) -> int:
    """``mofserve bench encoders``: :func:`main` on the profile and batch sizes the flags name."""
    return main(profile_from_args(args), batch_sizes=args.batch, repeats=args.repeats, output=args.output)


if __name__ == "__main__":  # the command's own two functions: no import of the CLI above this floor
    _parser = argparse.ArgumentParser(prog="python -m mofserve.benchmarks.encoders")
    arguments(_parser)
    _args = _parser.parse_args()
    configure_logging()
    raise SystemExit(run(_args))
