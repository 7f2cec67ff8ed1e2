"""benchmarks/gpu_check.py: its stages run on the CPU with the tiny profile (the dry run that
proves the code paths before a GPU is lent), time caps kill a stage and keep its partial results,
and the report scores each encoder against the measured matmul rate."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from mofserve.benchmarks import gpu_check as gc


def in_process(command: list[str], timeout: float) -> tuple[int, str]:
    """Run a stage the way its subprocess would (same argv), in this process: seconds, not minutes."""
    assert command[1:3] == ["-m", "mofserve.benchmarks.gpu_check"]
    try:
        return gc.main(command[3:]), ""
    except Exception:
        return 1, traceback.format_exc()


def dry_settings(out: Path, **overrides) -> gc.Settings:
    values = dict(out=out, device="cpu", profile="tiny", batches=(1, 2), compile_mode="none", matmul_n=256,
                  measure_s=0.05, max_runs=3, serve=False)
    values.update(overrides)
    return gc.Settings(**values)


def test_dry_run_on_cpu_runs_every_stage_and_writes_json_and_markdown(tmp_path: Path, capsys):
    report = gc.run_all(dry_settings(tmp_path), runner=in_process)
    statuses = {stage: entry["status"] for stage, entry in report["stages"].items()}
    assert statuses == {"environment": "ok", "accuracy": "ok", "eager": "ok", "compiled:clip_vision": "ok",
                        "compiled:dinov2_vision": "ok", "serving": "skipped"}
    assert report["stages"]["serving"]["reason"] == "--no-serve"
    assert report["environment"]["torch"] and report["matmul"]["gflops_per_s"] > 0
    for name in gc.ENCODERS:
        gate = report["accuracy"][name]
        assert gate["ok"] and gate["dtype"] == "bfloat16" and 0.999 <= gate["min_cosine"] < 1.0
        for kind in ("eager", "compiled"):
            rows = report[kind][name]
            assert rows["flops_per_image"] > 0 and set(rows["batches"]) == {"1", "2"}
            for row in rows["batches"].values():
                assert row["runs"] >= 3 and row["images_per_s"] > 0 and row["share_of_ceiling"] > 0
        summary = report["summary"]["encoders"][name]
        assert summary["eager"]["batch"] in (1, 2) and summary["target_met"] in (True, False)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| clip_vision | 2 |" in markdown and "## Stages" in markdown
    table = gc.format_table(report)
    assert table.splitlines()[3].startswith("| clip_vision |") and "stages: environment ok" in table


def test_a_stage_past_its_time_cap_is_killed_with_its_children(tmp_path: Path):
    started = time.perf_counter()
    rc, tail = gc._subprocess_runner(
        [sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '30']); print('working'); "
                               "time.sleep(30)"], timeout=1.0)
    assert rc == 124 and "working" in tail
    assert time.perf_counter() - started < 10
    assert subprocess.run(["pgrep", "-f", "^sleep 30$"], capture_output=True).stdout == b""


def test_a_failed_stage_keeps_its_partial_results_and_the_next_stages_run(tmp_path: Path):
    def runner(command: list[str], timeout: float) -> tuple[int, str]:
        argv = command[3:]
        if argv[argv.index("--stage") + 1] == "eager":  # the stage dies half-way: its part stays on disk
            part = Path(argv[argv.index("--part") + 1])
            part.write_text(json.dumps({"eager": {"clip_vision": {"flops_per_image": 1e9, "batches": {}}}}))
            return 1, "Traceback: CUDA error: an illegal memory access"
        return in_process(command, timeout)

    settings = dry_settings(tmp_path, stages=("environment", "eager", "compiled"))
    report = gc.run_all(settings, runner=runner)
    assert report["stages"]["eager"]["status"] == "failed"
    assert "illegal memory access" in report["stages"]["eager"]["log_tail"]
    assert report["eager"]["clip_vision"]["flops_per_image"] == 1e9
    assert report["stages"]["compiled:dinov2_vision"]["status"] == "ok"
    assert "accuracy" not in report["stages"]


def test_stages_are_skipped_once_the_budget_is_spent(tmp_path: Path):
    report = gc.run_all(dry_settings(tmp_path, budget_s=gc.MIN_STAGE_S - 1), runner=in_process)
    assert {e["status"] for e in report["stages"].values()} == {"skipped"}
    assert report["stages"]["environment"]["reason"].startswith("time budget spent")
    assert (tmp_path / "gpu_check.md").is_file()


def test_summary_scores_the_best_batch_against_the_best_ceiling_of_the_run():
    rows = {"flops_per_image": 400e9, "batches": {
        "8": {"batch": 8, "best_images_per_s": 1000.0}, "32": {"batch": 32, "best_images_per_s": 1100.0}}}
    report = {"ceilings": [700e3, 800e3], "eager": {"clip_vision": rows},
              "compiled": {"dinov2_vision": {"flops_per_image": 400e9, "batches": {
                  "64": {"batch": 64, "best_images_per_s": 900.0}}}},
              "accuracy": {"clip_vision": {"min_cosine": 0.9995}}}
    summary = gc.summarise(report)
    clip, dino = summary["encoders"]["clip_vision"], summary["encoders"]["dinov2_vision"]
    assert summary["ceiling_gflops_per_s"] == 800e3
    assert clip["eager"]["batch"] == 32 and clip["eager"]["share"] == pytest.approx(400 * 1100 / 800e3)
    assert clip["target_met"] is True and clip["min_cosine"] == 0.9995
    assert dino["compiled"]["share"] == pytest.approx(0.45) and dino["target_met"] is False


def test_serving_without_the_pytriton_wheel_is_skipped_with_the_command_that_fetches_it(tmp_path: Path):
    with pytest.raises(gc.StageSkipped, match=r"no nvidia-pytriton wheel in .*pip download nvidia-pytriton==0\.7\.0"):
        gc.install_triton_packages(tmp_path, tmp_path / "site", installed=False)


def test_bad_settings_are_refused_naming_the_option(tmp_path: Path):
    with pytest.raises(SystemExit, match="--measure-s: must be positive"):
        gc.settings_from(gc.build_parser().parse_args(["--out", str(tmp_path), "--measure-s", "0"]))
    with pytest.raises(SystemExit, match="--batches/--concurrency"):
        gc.settings_from(gc.build_parser().parse_args(["--out", str(tmp_path), "--batches", "0"]))


def test_settings_survive_the_trip_to_a_stage_subprocess(tmp_path: Path):
    settings = dry_settings(tmp_path, concurrency=(2, 3), modes=("clip",), wheels=tmp_path / "whl")
    again = gc.settings_from(gc.build_parser().parse_args(settings.argv()))
    assert again == settings


@pytest.mark.integration
def test_dry_run_serves_the_gpu_torch_repository_on_cpu_instances(tmp_path: Path):
    """The serving stage end to end: the gpu-torch repository (torch_encoder / torch_fuse models,
    DLPack in and out) on CPU instances of a real tritonserver, swept with tritonclient."""
    settings = dry_settings(tmp_path, serve=True, stages=("serving",), instance_kind="cpu", concurrency=(2,),
                            sweep_s=1.0, modes=("interleaved",), budget_s=400)
    report = gc.run_all(settings, runner=in_process)
    assert report["stages"]["serving"]["status"] == "ok", report["stages"]["serving"]
    assert report["checkpoints"]["rc"] == 0  # built in the background while the other stages ran
    parity = report["serving"]["parity"]  # fp32 on CPU instances: the served tokens are the in-process ones
    interleaved = parity["tokens_interleaved"]
    assert interleaved["min_cosine"] >= 0.9999 and interleaved["shape"] == [2, 512, 64]
    assert parity["tokens_additive"]["min_cosine"] >= 0.9999 and parity["tokens_additive"]["alpha"] == 0.3
    assert "alpha: must be within [0, 1]" in parity["alpha_1.5"]
    (point,) = report["serving"]["points"]
    assert point["model"] == "tokens_interleaved" and point["errors"] == 0 and point["requests_per_s"] > 0
    models = report["serving"]["triton_models"]
    assert models["clip_vision"]["inferences"] >= 1 and models["fuse_interleaved"]["inferences"] >= 1
    assert "llm" not in models
