"""``mofserve bench frontend``: what the gRPC front-end costs, and what Compare and a second mode cost.

One process, one run, one profile (default ``small``). A ``MofServeApp`` (Triton + the gRPC and
HTTP front-ends) is started in-process on free loopback ports, on an asyncio loop in a background
thread, exactly as ``mofserve serve`` runs it. Then, with an MMVP-style question and options
("Is the dog facing left or right?" / "(a) Left (b) Right"), greedy decoding and a fixed
``max_new_tokens`` (8), it measures three ways of answering one question about one image:

1. ``frontend``: ``MofServeClient.ask`` over gRPC to the front-end (which calls the
   ``vqa_<mode>`` ensemble of Triton through ``TritonEngine``);
2. ``direct``: the same ``vqa_<mode>`` ensemble of the same Triton, called with
   ``tritonclient.grpc`` (the same tensors the engine sends);
3. ``inprocess``: the same pipeline with no server, as a researcher would run it in a notebook:
   ``preprocess_bytes`` -> ``OnnxRunner`` on the exported graphs that Triton serves, with the
   profile's serving runtime and precision -> ``Fuser`` -> the LM through ``LLMEngine`` (one
   sequence at a time; ``benchmarks/pipelines.py``).

Every request sends a DIFFERENT image (deterministic crops / flips / colour jitter of the
scikit-image sample photos, checked to be distinct after preprocessing): the encoders cache
features per image inside Triton, so a repeated image would skip them. Every request therefore
pays for the encoders (a cold Ask). The three paths are interleaved request by request, the order
rotating from round to round, with a short idle gap between requests, so that background load
lands on all three alike; per mode, p50 / p99 / mean latency are reported.

Then, through the front-end:

4. ``Compare`` over the first k modes (k = 2 .. len(modes); by default interleaved, additive,
   clip, dinov2) on a fresh image vs one cold Ask of the first mode on a fresh image, interleaved
   round by round: ratio p50(Compare_k) / p50(cold Ask) against the target 1 + 0.25 (k - 1);
5. a second mode on a seen image: an Ask in mode B right after an Ask in mode A on the same image
   (B's encoders are all among A's, so they are answered from the cache) vs a cold Ask of mode B on
   a fresh image: ratio p50(seen B) / p50(cold B), target <= 0.25.

The shared machine is watched: besides the load average (which counts this benchmark too) every
phase records the cores used by OTHER processes (``/proc/stat`` minus this process tree, Triton
included). A time budget (``budget_s``) bounds the timed phases: on a busy machine they stop early
with fewer rounds rather than run for an hour, and the report says so.

It prints Markdown tables with MET / MISSED per target and writes a JSON report (machine, load
average, CPU use, versions, git commit, raw latencies and per-stage timings); ``pool_reports``
re-analyses several reports together. The pure helpers (percentiles, ratio / target evaluation,
budget, CPU accounting, tables, image variants, pooling) are unit-tested without servers.

This module is the command (``main``, ``arguments``, ``run``); the analysis and targets live in
``frontend_analysis``, the Markdown in ``frontend_tables``, the three paths and the timed phases in
``frontend_phases``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mofserve.core.feature_cache import content_key
from mofserve.core.logs import configure_logging
from mofserve.core.machine import (
    cpu_snapshot,
    cpu_usage,
    git_commit,
    load_average,
    machine_info,
    versions,
)
from mofserve.core.preprocessing import preprocess_bytes
from mofserve.core.profiles import Profile, add_profile_arguments, get_profile, profile_from_args
from mofserve.core.reports import write_json
from mofserve.core.samples import SAMPLE_PHOTOS, sample_photos

from .frontend_analysis import (
    DEFAULT_MODES,
    analyse_compare,
    analyse_paths,
    analyse_second_mode,
    default_requests,
    default_rounds,
    images_needed,
    parse_modes,
    pool_reports,
    second_mode_pairs,
)
from .frontend_phases import (
    PAUSE_S,
    Bench,
    LoopThread,
    phase_deadline,
    run_compare,
    run_paths,
    run_second_mode,
    warm_up,
)
from .frontend_tables import format_report
from .workload import MAX_NEW_TOKENS, OPTIONS, QUESTION, VARIANT_SEED, distinct_variants

_logger = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 480.0  # seconds for the timed phases (--budget-s), shared out by frontend_phases.PHASE_SHARES


# --------------------------------------------------------------------------------------------
# Entry point


def pool_main(reports: Sequence[Path | str], output: Path | str | None = None) -> int:
    """Pool earlier JSON reports (``--pool``), print the tables and write the pooled report."""
    pooled = pool_reports([json.loads(Path(p).read_text()) for p in reports])
    print(format_report(pooled))
    if output is not None:
        _write(pooled, Path(output))
    return 0


def _write(report: Mapping, path: Path) -> None:
    write_json(path, report)
    _logger.info(f"report -> {path}")


def main(profile=None, requests: int | None = None, modes: Sequence[str] | None = None,
         output: Path | str | None = None, compare_rounds: int | None = None,
         second_rounds: int | None = None, budget_s: float | None = DEFAULT_BUDGET_S) -> int:
    """Run the benchmark on ``profile`` (a Profile or a name; default ``small``), print the tables
    and write the JSON report to ``output`` if given. ``budget_s`` bounds the timed phases (None or
    0: no bound): each phase stops starting rounds when its share is spent (see PHASE_SHARES)."""
    from mofserve.export.pipeline import export_profile  # lazy: export imports torch (and tritonclient's protobufs)
    from mofserve.server.app import MofServeApp  # lazy: the server pulls grpc, aiohttp and tritonclient
    from mofserve.server.config import ServeConfig  # lazy: the server pulls grpc, aiohttp and tritonclient

    if profile is None or isinstance(profile, str):
        profile = get_profile(profile or "small")
    assert isinstance(profile, Profile)
    modes = parse_modes(modes)
    requests = default_requests(profile.name) if requests is None else int(requests)
    pairs = second_mode_pairs(modes)
    default_compare, default_second = default_rounds(requests, len(pairs))
    compare_rounds = default_compare if compare_rounds is None else compare_rounds
    second_rounds = default_second if second_rounds is None else second_rounds
    if len(modes) < 2:
        compare_rounds = 0
    if not pairs:
        second_rounds = 0
    started = time.perf_counter()
    load: dict[str, list[float]] = {"start": load_average()}
    machine = machine_info()
    _logger.info(f"{machine['cpu_model']} ({machine['usable_cpus']} usable CPUs); load average {load['start']}")
    _logger.info(f"profile {profile.name}: modes {', '.join(modes)}; {requests} requests per mode and path, "
                 f"{compare_rounds} Compare rounds, {second_rounds} second-mode rounds")

    built = export_profile(profile, target="cpu", log=lambda m: _logger.info(f"export {m}"))
    count = images_needed(modes, requests, compare_rounds, second_rounds)
    t = time.perf_counter()
    photos = sample_photos()

    def pixels_key(data: bytes) -> bytes:
        return content_key(preprocess_bytes(data, profile.image_size, aspect=profile.aspect))

    images = distinct_variants(photos, count, key=pixels_key)
    _logger.info(f"{count} distinct images (by preprocessed pixels) in {time.perf_counter() - t:.1f} s")

    config = ServeConfig(profile=profile.name, grpc_port=0, http_port=0, clip=profile.sources.clip,
                         dinov2=profile.sources.dinov2, llava=profile.sources.llava)
    loop = LoopThread()
    app = MofServeApp(config, log=lambda m: _logger.info(f"serve {m}"))
    bench: Bench | None = None
    try:
        t = time.perf_counter()
        endpoints = loop.run(app.start(), timeout=1800)
        startup_s = time.perf_counter() - t
        _logger.info(f"serving in {startup_s:.1f} s: gRPC {endpoints.grpc}, Triton {endpoints.triton_grpc}")
        t = time.perf_counter()
        bench = Bench(profile, built, endpoints, images)
        inprocess_load_s = time.perf_counter() - t
        triton_version = bench.triton.get_server_metadata().version
        _logger.info(f"in-process pipeline loaded in {inprocess_load_s:.1f} s ({bench.inprocess.runtime} "
                     f"{bench.inprocess.precision}); Triton {triton_version}")
        load["serving"] = load_average()

        cpu: dict[str, dict[str, float]] = {}

        def phase(name: str, work: Callable[[], Any]) -> Any:
            before, t0 = cpu_snapshot(), time.perf_counter()
            result = work()
            after = cpu_snapshot()
            load[f"after_{name}"] = load_average()
            if before is not None and after is not None:
                cpu[name] = cpu_usage(before, after)
            _logger.info(f"{name} phase in {time.perf_counter() - t0:.0f} s; cores used: {cpu.get(name)}")
            return result

        agreement = phase("warmup", lambda: warm_up(bench, modes))
        end = time.monotonic() + budget_s if budget_s else None
        ask_records = phase("ask", lambda: run_paths(bench, modes, requests,
                                                     phase_deadline("ask", time.monotonic(), end)))
        compare_records = phase("compare", lambda: run_compare(
            bench, modes, compare_rounds, phase_deadline("compare", time.monotonic(), end))) if compare_rounds else []
        second_records = phase("second_mode", lambda: run_second_mode(
            bench, pairs, second_rounds, phase_deadline("second_mode", time.monotonic(), end))) if second_rounds else []
    finally:
        if bench is not None:
            bench.close()
        try:
            loop.run(app.stop(), timeout=120)
        finally:
            loop.close()
    load["end"] = load_average()
    elapsed = time.perf_counter() - started

    report = {
        "benchmark": "frontend",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine,
        "versions": {**versions(), "tritonserver": triton_version},
        "profile": profile.name,
        "random_weights": profile.random_weights,
        "serving": asdict(profile.serving),
        "modes": list(modes),
        "question": QUESTION,
        "options": OPTIONS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "requests": len({r["round"] for r in ask_records}),
        "compare_rounds": len({r["round"] for r in compare_records}),
        "second_rounds": len({r["round"] for r in second_records}),
        "planned": {"requests": requests, "compare_rounds": compare_rounds, "second_rounds": second_rounds},
        "budget_s": budget_s,
        "pause_s": PAUSE_S,
        "photos": list(SAMPLE_PHOTOS),
        "images": {"count": len(images), "used": bench.used if bench else 0, "format": "JPEG q90",
                   "seed": VARIANT_SEED, "distinct_by": "blake2b of the preprocessed pixels (feature-cache key)"},
        "startup_s": round(startup_s, 1),
        "inprocess_load_s": round(inprocess_load_s, 1),
        "load_average": load,
        "cpu": cpu,
        "agreement": agreement,
        "paths": analyse_paths(ask_records, modes),
        "compare": analyse_compare(compare_records, modes),
        "second_mode": analyse_second_mode(second_records),
        "records": {"ask": ask_records, "compare": compare_records, "second_mode": second_records},
        "seconds": round(elapsed, 1),
    }
    print()
    print(format_report(report))
    _logger.info(f"done in {elapsed:.0f} s")
    if output is not None:
        _write(report, Path(output))
    return 0


def arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mofserve bench frontend`` (profile ``small`` by default, as the encoder benchmark)."""
    add_profile_arguments(parser)
    parser.set_defaults(profile="small")
    parser.add_argument("--requests", type=int, help="timed requests per mode and path (default 20)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for the timed phases; on a busy machine they stop early (0: no limit)")
    parser.add_argument("--modes", nargs="+", choices=DEFAULT_MODES,
                        help="fusion modes, the first is Compare's first and the seen-image Ask's A "
                             f"(default: {' '.join(DEFAULT_MODES)})")
    parser.add_argument("--output", type=Path, help="write the JSON report here")
    parser.add_argument("--pool", type=Path, nargs="+", metavar="REPORT",
                        help="run nothing: pool these JSON reports (same profile and modes) and print the tables")


def run(args: argparse.Namespace) -> int:
    """``mofserve bench frontend``: the benchmark, or with ``--pool`` only the pooling of earlier reports."""
    if args.pool:
        return pool_main(args.pool, output=args.output)
    return main(profile_from_args(args), requests=args.requests, modes=args.modes, output=args.output,
                budget_s=args.budget_s)


if __name__ == "__main__":  # the command's own two functions: no import of the CLI above this floor
    _parser = argparse.ArgumentParser(prog="python -m mofserve.benchmarks.frontend")
    arguments(_parser)
    _args = _parser.parse_args()
    configure_logging()
    raise SystemExit(run(_args))
