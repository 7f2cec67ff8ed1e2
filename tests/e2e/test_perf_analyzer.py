"""NVIDIA perf_analyzer against the session's real Triton (tiny profile): the tool is installed as
``mofserve bench perf-analyzer`` installs it (cached under $MOFSERVE_HOME/tools), fed real-image
input data, and its CSV parsed into the report, cross-checked with Triton's own metrics."""

from __future__ import annotations

import json

import pytest

from mofserve.benchmarks import perf_analyzer as PA
from mofserve.benchmarks import perf_analyzer_tool as PT
from mofserve.benchmarks.report import format_markdown, write_report

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tool():
    try:
        tool = PT.install_perf_analyzer()
        tool.version()
    except PT.ToolUnavailable as error:
        pytest.skip(f"perf_analyzer cannot be obtained here: {error}")
    return tool


def test_perf_analyzer_on_the_ensembles_gives_a_parsed_report(tool, tiny_triton, tmp_path):
    config = PA.PerfAnalyzerConfig(tiny_triton.grpc_url, models=["tokens_clip", "vqa_interleaved"],
                                   concurrency=[1, 2], images=4, request_count=8, stability_percent=50,
                                   max_trials=6, run_timeout_s=120, metrics_url=tiny_triton.metrics_url,
                                   max_new_tokens=4)
    section = PA.run_sweep(config, tool, work=tmp_path / "work", progress=lambda m: None)

    points = section["points"]
    assert [(p["model"], p["value"]) for p in points] == [("tokens_clip", 1), ("tokens_clip", 2),
                                                          ("vqa_interleaved", 1), ("vqa_interleaved", 2)]
    assert section["tool"]["version"].startswith("Perf Analyzer Version 2.51.0")
    for p in points:
        assert p["error"] is None, p["error"]
        assert p["kind"] == "concurrency" and p["throughput_rps"] > 0
        lat = p["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] and lat["mean"] > 0
        assert p["stages_ms"]["server_compute_infer"] > 0
        # Triton saw what perf_analyzer sent: at least three windows of 8 requests of this model,
        # each through its encoders (from their feature cache after the first pass over 4 images)
        models = p["triton"]["models"]
        assert models[p["model"]]["requests"] >= 3 * 8
        cache = p["triton"]["feature_cache"]["clip_vision"]
        assert cache["hit"] + cache["miss"] == models["clip_vision"]["requests"]
        csv_file = tmp_path / "work" / f"{p['model']}-c{p['value']}.csv"
        assert p["csv"] == csv_file.read_text()
    # the vqa ensemble ran the LLM on the question; the images were decoded (no preprocess errors)
    assert points[2]["triton"]["models"]["llm"]["requests"] >= 3 * 8
    assert "interleaved" in points[2]["model"] and "dinov2_vision" in points[2]["triton"]["models"]
    # every point sent its own 4 images never sent before (misses), then cycled through them (hits);
    # a miss or two more when two requests of a new image run at once (c=2)
    for p in points:
        cache = p["triton"]["feature_cache"]["clip_vision"]
        assert p["images"] == 4 and 4 <= cache["miss"] <= 6 and cache["hit"] > cache["miss"], cache

    report = PA.build_report(section, config.triton_grpc, "tiny")
    written = write_report(report, tmp_path / "out")
    assert {p.name for p in written} == {"report.json", "report.md", "perf_analyzer.png"}
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["throughput_rps"] for p in data["perf_analyzer"]["points"]] == [p["throughput_rps"] for p in points]
    assert "| vqa_interleaved | c=2 |" in format_markdown(report)
