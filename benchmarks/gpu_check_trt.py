"""The prepared GPU check of the ``gpu-trt`` target (``benchmarks/gpu_check_trt.sh OUTPUT_DIR``).

For a machine with a full Triton (its TensorRT backend), the ``tensorrt`` Python package and a CUDA
GPU: the project's Docker image (NGC tritonserver) is one. ``benchmarks/gpu_check.sh`` is the
other check, for a machine with PyTorch only (the gpu-torch target). Stages, each recorded in the
report as it ends so that a run cut short still leaves what it measured:

1. ``preflight``: every missing piece named at once (exit 2), before any minute is spent.
2. ``engines``: paper-shaped encoders with seeded random weights (``benchmarks.gpu_check``'s
   profile: CLIP ViT-L/14-336, DINOv2 ViT-L/14 at 336, no download) -> ONNX -> FP16 TensorRT
   engines with the accuracy gate against ONNX Runtime FP32 (``export.tensorrt_engine``; the build
   fails below min cosine 0.999): per engine the min cosine, build seconds and what stayed FP32.
3. ``serving``: Triton on the gpu-trt repository (``mofserve triton``'s launcher), the front-end
   before it (``mofserve serve --triton-url``), and per fusion mode a closed-loop Ask sweep with
   ``benchmarks.load`` (throughput, p50/p95), the card named.

Writes ``gpu_check_trt.json`` and ``gpu_check_trt.md`` to the output folder.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import filecmp
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mofserve.benchmarks.gpu_check_common import check_profile
from mofserve.benchmarks.load import LoadConfig, parse_target, run_load, summary_rows
from mofserve.benchmarks.serve_process import parse_ready
from mofserve.core.reports import write_json, write_text
from mofserve.server.launcher import TritonServer
from mofserve.server.triton_install import TRITON_ROOT_ENV, TritonNotInstalledError, find_tritonserver

MODES = ("clip", "dinov2", "additive", "interleaved")
CONCURRENCY = (1, 8, 32)


def log(message: str) -> None:
    print(f"[gpu-check-trt] {message}", file=sys.stderr, flush=True)


def missing_pieces() -> list[str]:
    """What this machine lacks for the check (empty: ready): TensorRT, a CUDA GPU, a full Triton."""
    missing = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing.append("the `tensorrt` Python package (the NGC tritonserver image has it)")
    import torch

    if not torch.cuda.is_available():
        missing.append(f"a CUDA GPU visible to torch {torch.__version__} (CPU build, no GPU, or no --gpus)")

    try:
        install = find_tritonserver()
    except TritonNotInstalledError as error:
        missing.append(f"a Triton installation ({error})")
    else:
        if install.backends_dir is None or not (install.backends_dir / "tensorrt").is_dir():
            where = install.backends_dir or f"the nvidia-pytriton wheel's Triton ({install.binary})"
            missing.append(f"Triton's TensorRT backend (not in {where}); set {TRITON_ROOT_ENV} to a full "
                           f"Triton (e.g. /opt/tritonserver in the project's image)")
    return missing


def _write(out: Path, report: dict) -> None:
    write_json(out / "gpu_check_trt.json", report)
    write_text(out / "gpu_check_trt.md", format_markdown(report))


def stage_engines(report: dict, profile) -> object:
    from mofserve.export.pipeline import export_profile  # lazy: export imports torch (and tritonclient's protobufs)

    started = time.perf_counter()
    built = export_profile(profile, target="gpu-trt", log=log)
    # lazy: export imports torch (and tritonclient's protobufs)
    from mofserve.export.tensorrt_engine import ENGINE_MANIFEST, PLAN_FILE, engines_dir

    engines = {}
    for plan in sorted(built.path.glob(f"*/1/{PLAN_FILE}")):  # hard links of the cached engines
        model = plan.parent.parent.name
        cached = [f for f in engines_dir().glob(f"{model}-*/{PLAN_FILE}") if filecmp.cmp(f, plan, shallow=False)]
        if cached:
            m = json.loads((cached[0].parent / ENGINE_MANIFEST).read_text())
            engines[m["model"]] = {"min_cosine": m["gate"]["min_cosine"], "build_s": m["seconds"],
                                   "tensorrt": m["tensorrt"], "typing": m["build"]["typing"],
                                   "fp32_op_types": m["build"]["fp32_op_types"], "fp32_nodes": m["build"]["fp32_nodes"]}
    report["engines"] = {"seconds": round(time.perf_counter() - started, 1), "repository": str(built.path),
                         "per_model": engines}
    return built


def _frontend(triton_grpc: str, triton_metrics: str, log_path: Path) -> tuple[subprocess.Popen, dict]:
    log_file = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mofserve", "serve", "--profile", "paper", "--grpc-port", "0", "--http-port", "0",
         "--triton-url", f"grpc://{triton_grpc}", "--triton-metrics-url", triton_metrics],
        stdout=subprocess.PIPE, stderr=log_file, text=True)
    for line in process.stdout:
        found = parse_ready(line.strip())
        if found:
            return process, found
    raise RuntimeError(f"the front-end exited before READY (code {process.wait()}); see {log_path}")


def stage_serving(report: dict, built, out: Path, seconds: float, concurrency: Sequence[int]) -> None:
    report["serving"] = {"modes": {}}
    with TritonServer(built.path, log_file=out / "triton.log") as triton:
        frontend, endpoints = _frontend(triton.grpc_url, triton.metrics_url, out / "frontend.log")
        try:
            for mode in MODES:
                config = LoadConfig(target=parse_target(endpoints["grpc"]), concurrency=list(concurrency),
                                    duration_s=seconds, warmup_s=2.0, mix={mode: 1.0}, repeat_ratio=0.0,
                                    max_new_tokens=8, triton_metrics=triton.metrics_url, progress=False)
                points = summary_rows(asyncio.run(run_load(config))["points"])
                report["serving"]["modes"][mode] = [
                    {"concurrency": p["value"], "throughput_rps": p["throughput_rps"],
                     "p50_ms": p["latency_ms"]["p50"], "p95_ms": p["latency_ms"]["p95"],
                     "errors": p.get("errors")} for p in points]
                log(f"{mode}: " + ", ".join(f"c={p['value']:g} {p['throughput_rps']:.1f} req/s p50 "
                                            f"{p['latency_ms']['p50']:.0f} ms" for p in points))
                _write(out, report)
        finally:
            frontend.terminate()
            frontend.wait(60)


def format_markdown(report: dict) -> str:
    lines = [f"# GPU check (TensorRT): {report.get('gpu', '?')}", "",
             f"{report.get('created')} · TensorRT {report.get('tensorrt', '?')} · status {report.get('status')}", ""]
    engines = report.get("engines", {}).get("per_model", {})
    if engines:
        lines += ["| engine | min cosine vs ORT fp32 | build s | typing | kept FP32 |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {e['min_cosine']:.6f} | {e['build_s']} | {e['typing']} | "
                  f"{e['fp32_nodes']} nodes ({', '.join(e['fp32_op_types'])}) |" for name, e in engines.items()]
        lines.append("")
    modes = report.get("serving", {}).get("modes", {})
    if modes:
        lines += ["| mode | concurrency | req/s | p50 ms | p95 ms |", "|---|---|---|---|---|"]
        lines += [f"| {mode} | {p['concurrency']} | {p['throughput_rps']:.1f} | {p['p50_ms']:.0f} | {p['p95_ms']:.0f} |"
                  for mode, points in modes.items() for p in points]
    if report.get("error"):
        lines += ["", f"Stopped: {report['error']}"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per (mode, concurrency)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    args = parser.parse_args(argv)
    missing = missing_pieces()
    if missing:
        print("gpu_check_trt: this machine cannot run the TensorRT check; missing:\n  - " + "\n  - ".join(missing)
              + "\nRun it inside the project's Docker image on a GPU host (docs/deployment.md, GPU check); "
                "benchmarks/gpu_check.sh checks the gpu-torch target on a machine with PyTorch only.",
              file=sys.stderr)
        return 2
    import tensorrt
    import torch

    report = {"benchmark": "gpu_check_trt", "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(0), "tensorrt": tensorrt.__version__, "status": "running"}
    log(f"{report['gpu']}, TensorRT {report['tensorrt']}")
    try:
        built = stage_engines(report, check_profile("paper"))
        _write(args.out, report)
        stage_serving(report, built, args.out, args.seconds, args.concurrency)
        report["status"] = "ok"
    except Exception as error:  # recorded: the report says how far it got
        report["status"], report["error"] = "failed", f"{type(error).__name__}: {error}"
        log(report["error"])
    _write(args.out, report)
    print(format_markdown(report))
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
