"""The prepared GPU check of the ``gpu-torch`` target (``benchmarks/gpu_check.sh OUTPUT_DIR``).

A GPU machine is lent for a few minutes at a time, with PyTorch but no registry, so this one
command must measure everything worth knowing in under 8 minutes, survive any stage failing,
and leave results behind whatever happens. Stages, each in its own subprocess with its own time
cap (a hung compile is killed, not waited for) and writing its part as it goes:

1. ``environment``: card, torch/CUDA versions, bf16 support; the bf16 matrix-multiply rate
   (8192^3, best of a few) that every share below is taken of.
2. ``accuracy``: paper-shaped encoders (CLIP ViT-L/14-336, DINOv2 ViT-L/14 at 336, random
   seeded weights built on the device, nothing downloaded) through the accuracy gate of
   ``export.torch_runtime``: bf16 vs fp32, min cosine per token row, gate >= 0.999.
3. ``eager``: images/s per encoder at batch 1, 8, 32, 64, eager bf16.
4. ``llm``: the in-flight batching engine on a 32-layer LLaMA-7B-shaped LM (random bf16 weights
   built on the device): prefill ms, decode tokens/s at 1 / 8 / 32 sequences batched against one
   at a time, ms per decode step, the share of HBM bandwidth, a CUDA-graph step.
5. ``compiled:<encoder>``: the same with ``torch.compile`` (one static graph per batch size),
   largest batches first so that a cut-short stage still has the best-batch figure.
6. ``serving`` (optional): when the ``nvidia-pytriton`` wheel (and ``tritonclient``) is found,
   installs them with ``pip install --no-deps --target``, writes the gpu-torch repository for a
   paper-shaped random model, starts tritonserver with our launcher and sweeps concurrency per
   fusion mode over the ``tokens_<mode>`` ensembles.

This module holds the orchestration and the ``environment`` stage (the settings, the plan and what
the stages share are in ``gpu_check_common``, which imports none of them); the others live
in ``gpu_check_encoders`` (2-3, 5), ``gpu_check_llm`` (4) and ``gpu_check_serving`` (6), the report
in ``gpu_check_report``. Each encoder's FLOPs per image come from its shapes (``benchmarks.flops``);
its share of the bf16 rate uses the best run (as the ceiling does). ``--device cpu --profile tiny``
runs every stage on the CPU in seconds, which is how the tests prove the code paths before anyone
spends GPU minutes. Writes ``gpu_check.json`` and ``gpu_check.md`` into the output folder and
prints a short table last.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from mofserve.benchmarks import gpu_check_encoders as encoders
from mofserve.benchmarks import gpu_check_llm as llm
from mofserve.benchmarks import gpu_check_serving as serving
from mofserve.benchmarks.gpu_check_common import (  # noqa: F401 (BATCHES...: this module's names too)
    BATCHES,
    DEFAULT_BUDGET_S,
    ENCODERS,
    PLAN,
    TARGET_SHARE,
    Part,
    Settings,
    StageSkipped,
    _device,
    check_profile,
    log,
    measure_matmul,
    synchronize,
)
from mofserve.benchmarks.gpu_check_report import format_table, merge_part, summarise, write_report

WHEELS_ENV = "MOFSERVE_WHEELS"
MIN_STAGE_S = 15.0  # a stage with less time than this left is skipped, not started


# --------------------------------------------------------------------------------------------
# Models: paper-shaped (or tiny) random encoders, built on the device (gpu_check_encoders)


# --------------------------------------------------------------------------------------------
# Measurements


# --------------------------------------------------------------------------------------------
# Stages (each runs in its own subprocess; ``part`` is written as results come in)


def stage_environment(settings: Settings, part: Part) -> None:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "host": platform.node()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError as error:
        info["transformers"] = f"missing: {error}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(card=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                    multiprocessors=props.multi_processor_count)
    else:
        info.update(card=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    part.update(environment=info)
    device = _device(settings)
    rates = [measure_matmul(device, settings.matmul_n) for _ in range(2)]
    part.update(matmul={"n": settings.matmul_n, "dtype": "bf16", "gflops_per_s": max(rates), "runs": rates})


def run_stage(stage: str, settings: Settings, part_path: Path, deadline: float) -> int:
    part = Part(part_path)
    try:
        if stage == "checkpoints":
            serving.stage_checkpoints(settings, part)
        elif stage == "environment":
            stage_environment(settings, part)
        elif stage == "accuracy":
            encoders.stage_accuracy(settings, part)
        elif stage == "eager":
            encoders.stage_eager(settings, part)
        elif stage.startswith("compiled:"):
            encoders.stage_compiled(settings, part, stage.split(":", 1)[1])
        elif stage == "llm":
            llm.stage_llm(settings, part, deadline)
        elif stage == "serving":
            serving.stage_serving(settings, part, deadline)
        else:
            raise ValueError(f"stage: unknown stage {stage!r}")
    except StageSkipped as reason:
        part.update(skipped=str(reason))
        log(f"{stage}: skipped: {reason}")
        return 0
    return 0


# --------------------------------------------------------------------------------------------
# Orchestration, report


def stage_caps(settings: Settings) -> list[tuple[str, float]]:
    """The stages to run with their time caps; the CPU dry run (tiny models) needs far less."""
    plan = [(s, cap) for s, cap in PLAN if s in settings.stages or s.split(":")[0] in settings.stages]
    return plan


Runner = Callable[[list[str], float], tuple[int, str]]


def run_all(settings: Settings, runner: Runner | None = None) -> dict:
    """Run every stage in a subprocess within the budget; return (and write) the merged report."""
    settings.out.mkdir(parents=True, exist_ok=True)
    parts = settings.out / "parts"
    parts.mkdir(exist_ok=True)
    began = time.time()
    deadline = began + settings.budget_s
    report: dict = {"started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    "settings": {k: v for k, v in asdict(settings).items() if k != "out"}, "stages": {}}
    runner = runner or _subprocess_runner
    plan = stage_caps(settings)
    # the serving stage's checkpoints (CPU work: random init, gigabytes written) are built meanwhile
    background = (_start_background("checkpoints", settings, parts)
                  if settings.serve and any(stage == "serving" for stage, _ in plan) else None)
    try:
        _run_plan(plan, settings, report, runner, parts, began, deadline, background)
    finally:
        if background is not None and background.poll() is None:
            _stop_group(background, 2.0)
    report["summary"] = summarise(report)
    write_report(report, settings.out)
    return report


def _start_background(stage: str, settings: Settings, parts: Path) -> subprocess.Popen:
    part_path = parts / f"{stage}.json"
    part_path.unlink(missing_ok=True)
    log(f"stage {stage}: in the background (output in {parts / (stage + '.log')})")
    with open(parts / f"{stage}.log", "wb") as output:
        return subprocess.Popen([sys.executable, "-m", "mofserve.benchmarks.gpu_check", "--stage", stage,
                                 "--part", str(part_path), *settings.argv()], stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _run_plan(plan: Sequence[tuple[str, float]], settings: Settings, report: dict, runner: Runner, parts: Path,
              began: float, deadline: float, background: subprocess.Popen | None) -> None:
    """Run the planned stages one by one, each in ``runner`` under its cap, merging their parts."""
    for stage, cap in plan:
        if stage == "serving" and background is not None:
            wait_s = max(0.0, deadline - time.time() - MIN_STAGE_S)
            try:  # the serving stage builds the checkpoints itself if this did not
                background.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                _stop_group(background, 2.0)
            part = parts / "checkpoints.json"
            report["checkpoints"] = {"rc": background.returncode,
                                     **(json.loads(part.read_text()) if part.is_file() else {})}
        left = deadline - time.time()
        if left < MIN_STAGE_S:
            report["stages"][stage] = {"status": "skipped", "reason": f"time budget spent ({left:.0f} s left)"}
            continue
        # the last stage takes what is left; a stage stopped at its cap gets STOP_GRACE_S more to stop
        timeout = left - STOP_GRACE_S if stage == "serving" else min(cap, left - STOP_GRACE_S)
        part_path = parts / f"{stage.replace(':', '_')}.json"
        part_path.unlink(missing_ok=True)
        log(f"stage {stage}: up to {timeout:.0f} s")
        stage_began = time.time()
        command = [sys.executable, "-m", "mofserve.benchmarks.gpu_check", "--stage", stage, "--part", str(part_path),
                   "--deadline", str(stage_began + timeout), *settings.argv()]
        rc, tail = runner(command, timeout)
        data = json.loads(part_path.read_text()) if part_path.is_file() else {}
        status = "skipped" if "skipped" in data else ("ok" if rc == 0 else "timed out" if rc == 124 else "failed")
        entry = {"status": status, "seconds": round(time.time() - stage_began, 1), "rc": rc}
        if "skipped" in data:
            entry["reason"] = data.pop("skipped")
        if status in ("failed", "timed out"):
            entry["log_tail"] = tail
            log(f"stage {stage}: {status} (rc {rc}); partial results kept\n{tail}")
        report["stages"][stage] = entry
        merge_part(report, stage, data)
        report["seconds"] = round(time.time() - began, 1)
        write_report(report, settings.out)


STOP_GRACE_S = 10.0  # SIGTERM first (a serving stage stops its tritonserver), SIGKILL after this


def _stop_group(process: subprocess.Popen, grace: float) -> None:
    """Stop a stage's process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    import signal

    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _subprocess_runner(command: list[str], timeout: float) -> tuple[int, str]:
    """Run one stage in its own process group, its output streamed to stderr as it comes; at
    ``timeout`` the group is stopped (a compile cannot be interrupted from inside), rc 124."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=25)

    def pump() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
            sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(process, STOP_GRACE_S)
        rc = 124
    except BaseException:  # the check itself is being stopped: take the stage down with it
        _stop_group(process, 2.0)
        raise
    reader.join(5.0)
    return rc, "\n".join(tail)


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="GPU check of the gpu-torch target (see docs/benchmarks.md)")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json / gpu_check.md")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run)")
    parser.add_argument("--profile", default="paper", choices=("paper", "tiny"))
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time for all stages")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--compile-mode", default="default",
                        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs", "none"),
                        help="torch.compile mode of the compiled stage (none: its plumbing only, for dry runs)")
    parser.add_argument("--matmul-n", type=int, default=8192)
    parser.add_argument("--measure-s", type=float, default=2.0)
    parser.add_argument("--max-runs", type=int, default=30)
    parser.add_argument("--no-serve", dest="serve", action="store_false")
    parser.add_argument("--wheels", type=Path, default=os.environ.get(WHEELS_ENV),
                        help=f"folder with the nvidia-pytriton and tritonclient wheels (${WHEELS_ENV})")
    parser.add_argument("--instance-kind", default="gpu", choices=("gpu", "cpu"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--sweep-s", type=float, default=5.0)
    parser.add_argument("--modes", nargs="+", default=["clip", "dinov2", "additive", "interleaved"])
    parser.add_argument("--llm-prompts", type=int, nargs="+", default=[640, 1216],
                        help="prompt positions timed in prefill (the first is the decode runs' prompt)")
    parser.add_argument("--llm-concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--llm-new-tokens", type=int, default=64)
    parser.add_argument("--llm-serial", type=int, default=8, help="sequences decoded one at a time")
    parser.add_argument("--stages", nargs="+", default=[s for s, _ in PLAN],
                        help="subset of: environment accuracy eager llm compiled serving (or compiled:<encoder>)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    for name in ("budget_s", "measure_s", "sweep_s"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    if any(b < 1 for b in args.batches) or any(c < 1 for c in args.concurrency):
        raise SystemExit("--batches/--concurrency: must be positive integers")
    llm = [*args.llm_prompts, *args.llm_concurrency, args.llm_new_tokens, args.llm_serial]
    if any(v < 1 for v in llm) or args.llm_new_tokens < 2:
        raise SystemExit("--llm-prompts/--llm-concurrency/--llm-new-tokens/--llm-serial: must be positive "
                         "integers (at least 2 new tokens: decoding starts after the first)")
    return Settings(out=args.out, device=args.device, profile=args.profile, budget_s=args.budget_s,
                    batches=tuple(args.batches), compile_mode=args.compile_mode, matmul_n=args.matmul_n,
                    measure_s=args.measure_s, max_runs=args.max_runs, serve=args.serve,
                    wheels=Path(args.wheels) if args.wheels else None, instance_kind=args.instance_kind,
                    concurrency=tuple(args.concurrency), sweep_s=args.sweep_s, modes=tuple(args.modes),
                    llm_prompts=tuple(args.llm_prompts), llm_concurrency=tuple(args.llm_concurrency),
                    llm_new_tokens=args.llm_new_tokens, llm_serial=args.llm_serial, stages=tuple(args.stages))


def _exit_on_sigterm() -> None:
    """SIGTERM (the time cap, or ``timeout`` around the script) raises SystemExit, so that a serving
    stage stops its tritonserver and the orchestrator stops the running stage."""
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    _exit_on_sigterm()
    if args.stage:
        return run_stage(args.stage, settings, args.part, args.deadline or time.time() + settings.budget_s)
    report = run_all(settings)
    print(format_table(report), flush=True)
    return 0


if __name__ == "__main__":
    # StageSkipped, Settings... live in gpu_check_common, which the stage modules import (never
    # this one): this __main__ copy and the package's module catch the same StageSkipped
    sys.exit(main())
