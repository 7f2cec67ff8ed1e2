"""benchmarks/gpu_check.py: its stages run on the CPU with the tiny profile (the dry run that
proves the code paths before a GPU is lent, the llm stage on a 2-layer LLaMA), time caps kill a
stage and keep its partial results, and the report scores each encoder against the measured
matmul rate."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from mofserve.benchmarks import gpu_check as gc
from mofserve.benchmarks import gpu_check_llm as gcl
from mofserve.benchmarks import gpu_check_report as gcr
from mofserve.benchmarks import gpu_check_serving as gcs


def in_process(command: list[str], timeout: float) -> tuple[int, str]:
    """Run a stage the way its subprocess would (same argv), in this process: seconds, not minutes."""
    assert command[1:3] == ["-m", "mofserve.benchmarks.gpu_check"]
    try:
        return gc.main(command[3:]), ""
    except Exception:
        return 1, traceback.format_exc()


def dry_settings(out: Path, **overrides) -> gc.Settings:
    values = dict(out=out, device="cpu", profile="tiny", batches=(1, 2), compile_mode="none", matmul_n=256,
                  measure_s=0.05, max_runs=3, serve=False, llm_prompts=(64, 96), llm_concurrency=(1, 2, 4),
                  llm_new_tokens=6, llm_serial=2)
    values.update(overrides)
    return gc.Settings(**values)


def test_dry_run_on_cpu_runs_every_stage_and_writes_json_and_markdown(tmp_path: Path, capsys):
    report = gc.run_all(dry_settings(tmp_path), runner=in_process)
    statuses = {stage: entry["status"] for stage, entry in report["stages"].items()}
    assert statuses == {"environment": "ok", "accuracy": "ok", "eager": "ok", "llm": "ok",
                        "compiled:clip_vision": "ok", "compiled:dinov2_vision": "ok", "serving": "skipped"}
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
    table = gcr.format_table(report)
    assert table.splitlines()[3].startswith("| clip_vision |") and "stages: environment ok" in table
    assert "llm (2 layers" in table and "4 seqs" in table and "prefill 64:" in table
    assert "## LLM: in-flight batching engine" in markdown and "| 4 |" in markdown


def test_llm_dry_run_decodes_batched_and_one_at_a_time_and_times_the_step(tmp_path: Path):
    report = gc.run_all(dry_settings(tmp_path, stages=("llm",)), runner=in_process)
    assert report["stages"]["llm"]["status"] == "ok", report["stages"]["llm"]
    llm = report["llm"]
    model = llm["model"]
    assert (model["layers"], model["kv_heads"], model["dtype"]) == (2, 2, "bfloat16")  # GQA, as in the tiny profile
    assert model["decode_weight_bytes"] < model["weight_bytes"] and "cut_short" not in llm
    assert [p["prompt_tokens"] for p in llm["prefill"].values()] == [64, 96]
    assert all(p["median_ms"] > 0 and 0 < p["visual_tokens"] < p["prompt_tokens"] for p in llm["prefill"].values())
    serial = llm["decode"]["one_at_a_time"]
    assert serial["sequences"] == 2 and serial["max_sequences"] == 1 and serial["mean_batch"] == 1
    assert serial["all_ran_to_their_limit"] and serial["tokens"] == 2 * 6  # EOS unset: every token is written
    assert serial["full_batch_steps"] == 5  # the first token comes with the prefill
    for n in ("2", "4"):
        run = llm["decode"]["batched"][n]
        assert run["sequences"] == run["max_sequences"] == int(n) and run["all_ran_to_their_limit"]
        assert run["mean_batch"] > 1 and run["full_batch_steps"] >= 1 and run["ratio"] > 0
        assert run["one_at_a_time_scaled_from"] == 2 and "token_ids" not in run
        agree = run["agreement_with_one_at_a_time"]
        assert agree["sequences"] == 2 and agree["mean_common_prefix"] >= 1  # the first token is the prefill's
    joining = llm["joining"]
    assert "error" not in joining, joining.get("error")
    assert list(joining["runs"]) == ["0", "256", "512"] and joining["runs"]["256"]["prefill_forwards"] == 4 * 5
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "A request joins running streams" in markdown and "| 0 (whole) | 4 |" in markdown
    assert set(llm["steps"]) == {"1", "2", "4"}
    for step in llm["steps"].values():
        assert step["step_ms"] > 0 and step["enqueue_ms"] > 0 and step["hbm_share"] is None  # no HBM on a CPU
    for graph in llm["graphs"].values():  # no CUDA here: the graph's step is checked against decode_step
        assert graph["copy_max_abs_diff"] == 0.0 and graph["graph"].startswith("needs CUDA")


def test_the_graph_step_with_a_fixed_length_is_decode_step_at_unequal_lengths():
    import torch

    from mofserve.core.kv_slots import decode_step

    vlm = gcl.build_vlm("tiny", torch.device("cpu"))
    lengths = torch.tensor([3, 9, 5])
    results = []
    for step in (decode_step, lambda *args: decode_step(*args, longest=10)):
        cache, embeds, _ = gcl.step_inputs(vlm, 3, 16)
        for layer in (*cache.keys, *cache.values):
            layer.normal_(generator=torch.Generator().manual_seed(1))
        results.append(step(vlm.model, cache, embeds, lengths))
    assert torch.equal(results[0], results[1])


def test_a_failed_llm_measurement_is_reported_and_the_report_still_renders():
    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 10.50 GiB")

    failed = gcl._attempt(out_of_memory, None, 32)
    assert failed == {"error": "RuntimeError: CUDA out of memory. Tried to allocate 10.50 GiB"}
    run = {"tokens_per_s": 40.0, "ratio": 5.0, "full_batch_step_ms": 20.0, "full_batch_tokens_per_s": 400.0,
           "agreement_with_one_at_a_time": {"identical": 7, "sequences": 8, "mean_common_prefix": 60.5}}
    llm = {"model": {"layers": 32, "hidden": 4096, "params": 6_738_415_616, "dtype": "bfloat16", "card": "NVIDIA H200",
                     "weight_bytes": 13.5e9, "decode_weight_bytes": 13.2e9, "kv_bytes_per_token": 2**19,
                     "attention": "sdpa", "build_s": 4.0, "hbm_peak_bytes_per_s": 4.8e12},
           "decode": {"prompt_tokens": 640, "new_tokens": 64, "batched": {"8": run, "32": failed},
                      "one_at_a_time": {"sequences": 8, "tokens_per_s": 8.0, "full_batch_step_ms": 12.0,
                                        "full_batch_tokens_per_s": 83.3, "hbm_share": 0.23}},
           "steps": {"1": {"step_ms": 10.0, "enqueue_ms": 9.9, "bytes_read": 13.5e9, "hbm_share": 0.28},
                     "32": failed},
           "graphs": {"1": {"error": "RuntimeError: operation not permitted when stream is capturing"}}}
    line = gcr.llm_summary_line(llm)
    assert line.startswith("llm (32 layers, 6.74B, bfloat16); 1 seq 8.0 tok/s (12.00 ms/step, 23% of HBM")
    assert "8 seqs 40.0 tok/s (5.0x one at a time)" in line and "32 seqs: RuntimeError: CUDA out of memory" in line
    markdown = "\n".join(gcr.llm_markdown(llm))
    assert "| 8 | 40.0 | 8.0 | 5.00 | 20.00 | 400.0 | - | 7/8 (common start 60.5) |" in markdown
    assert "| 32 | RuntimeError: CUDA out of memory" in markdown and "operation not permitted" in markdown


def test_hbm_peak_is_read_from_the_card_name():
    assert gcl.hbm_peak("NVIDIA H100 80GB HBM3") == 3.35e12 and gcl.hbm_peak("NVIDIA H200") == 4.8e12
    assert gcl.hbm_peak("NVIDIA H100 PCIe") == 2.0e12 and gcl.hbm_peak("NVIDIA H100 NVL") == 3.9e12
    assert gcl.hbm_peak("cpu") is None


def test_the_paper_lm_is_32_layers_of_vicuna_7b_and_fits_the_time_budget():
    shape = gcl.LLM_SHAPES["paper"]
    assert (shape["num_hidden_layers"], shape["hidden_size"], shape["intermediate_size"]) == (32, 4096, 11008)
    assert (shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]) == (32, 32, 32000)
    caps = dict(gc.PLAN)
    assert "llm" in caps and list(caps).index("llm") < list(caps).index("compiled:clip_vision")
    assert sum(cap for stage, cap in gc.PLAN if stage != "serving") <= gc.DEFAULT_BUDGET_S - gc.MIN_STAGE_S


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
    summary = gcr.summarise(report)
    clip, dino = summary["encoders"]["clip_vision"], summary["encoders"]["dinov2_vision"]
    assert summary["ceiling_gflops_per_s"] == 800e3
    assert clip["eager"]["batch"] == 32 and clip["eager"]["share"] == pytest.approx(400 * 1100 / 800e3)
    assert clip["target_met"] is True and clip["min_cosine"] == 0.9995
    assert dino["compiled"]["share"] == pytest.approx(0.45) and dino["target_met"] is False


def test_serving_without_the_pytriton_wheel_is_skipped_with_the_command_that_fetches_it(tmp_path: Path):
    with pytest.raises(gc.StageSkipped, match=r"no nvidia-pytriton wheel in .*pip download nvidia-pytriton==0\.7\.0"):
        gcs.install_triton_packages(tmp_path, tmp_path / "site", installed=False)


def test_bad_settings_are_refused_naming_the_option(tmp_path: Path):
    with pytest.raises(SystemExit, match="--measure-s: must be positive"):
        gc.settings_from(gc.build_parser().parse_args(["--out", str(tmp_path), "--measure-s", "0"]))
    with pytest.raises(SystemExit, match="--batches/--concurrency"):
        gc.settings_from(gc.build_parser().parse_args(["--out", str(tmp_path), "--batches", "0"]))
    with pytest.raises(SystemExit, match="--llm-prompts/--llm-concurrency/--llm-new-tokens"):
        gc.settings_from(gc.build_parser().parse_args(["--out", str(tmp_path), "--llm-new-tokens", "1"]))


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
