"""perf_analyzer's pure parts: its CSV (real files it wrote here, in tests/fixtures/perf_analyzer/),
the ``--input-data`` JSON for the ensembles, the command line and the report's table. Running the
real binary against Triton is tests/e2e/test_perf_analyzer.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from mofserve.benchmarks import perf_analyzer as PA
from mofserve.benchmarks import perf_analyzer_tool as PT
from mofserve.benchmarks.report import format_markdown, format_perf_analyzer_table, write_report

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "perf_analyzer"
# perf_analyzer 2.51.0 -f ... --verbose-csv --collect-metrics, tokens_clip, --concurrency-range 1:2 (tiny, CPU)
VERBOSE = FIXTURES / "tokens_clip_c1-2_verbose_metrics.csv"
# perf_analyzer 2.51.0 -f ... (no --verbose-csv), vqa_additive, --concurrency-range 2:2
PLAIN = FIXTURES / "vqa_additive_c2_plain.csv"


def test_verbose_csv_with_metrics_gives_one_point_per_concurrency_in_ms():
    rows = PA.parse_csv(VERBOSE.read_text())
    assert [(r["kind"], r["value"]) for r in rows] == [("concurrency", 1.0), ("concurrency", 2.0)]
    first = rows[0]
    assert first["throughput_rps"] == pytest.approx(52.2669)
    assert first["latency_ms"] == pytest.approx({"p50": 19.062, "p90": 21.532, "p95": 21.787, "p99": 22.661,
                                                 "mean": 19.136})
    assert first["stages_ms"]["server_compute_infer"] == pytest.approx(11.212)
    assert first["stages_ms"]["network_server_send_recv"] == pytest.approx(7.059)
    assert first["stages_ms"]["response_wait"] == pytest.approx(19.032)
    assert first["gpu"] == {}  # the GPU metric columns are empty on a CPU machine
    lat = rows[1]["latency_ms"]
    assert lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"]


def test_plain_csv_has_no_mean_column_and_still_parses():
    (row,) = PA.parse_csv(PLAIN.read_text())
    assert row["value"] == 2.0 and row["throughput_rps"] == pytest.approx(46.8754)
    assert row["latency_ms"]["p99"] == pytest.approx(58.882) and "mean" not in row["latency_ms"]
    assert "response_wait" not in row["stages_ms"] and row["stages_ms"]["server_queue"] == pytest.approx(0.010)


def test_csv_stops_at_the_first_blank_line_and_rejects_other_tables():
    text = VERBOSE.read_text() + "\nServer Prometheus Metrics,,\nsomething,else\n"
    assert len(PA.parse_csv(text)) == 2
    with pytest.raises(ValueError, match="perf_analyzer CSV"):
        PA.parse_csv("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no rows"):
        PA.parse_csv(VERBOSE.read_text().splitlines()[0] + "\n")


def test_image_is_sent_as_triton_serialised_bytes():
    from tritonclient.utils import deserialize_bytes_tensor

    image = b"\xff\xd8\xff\xe0 not really a jpeg \x00\x01"
    element = PA.bytes_element(image)
    raw = base64.b64decode(element["b64"])
    assert raw[:4] == len(image).to_bytes(4, "little")
    (decoded,) = deserialize_bytes_tensor(raw)  # what Triton makes of it
    assert decoded == image


def test_input_data_per_ensemble_kind():
    images = [b"one", b"two", b"three"]
    vqa = PA.input_data("vqa_interleaved", images, "Is it?", "(a) Yes (b) No", 4)
    assert len(vqa["data"]) == 3
    assert vqa["data"][1]["QUESTION"] == ["Is it?"] and vqa["data"][1]["OPTIONS"] == ["(a) Yes (b) No"]
    assert vqa["data"][1]["MAX_NEW_TOKENS"] == [4] and "ALPHA" not in vqa["data"][1]  # the profile's default
    free_form = PA.input_data("vqa_clip", images[:1], "Describe.", "", 8)
    assert "OPTIONS" not in free_form["data"][0]
    tokens = PA.input_data("tokens_additive", images, "ignored", "ignored", 1)
    assert [set(d) for d in tokens["data"]] == [{"IMAGE"}] * 3
    assert set(PA.input_data("embed", images[:1], "", "", 1)["data"][0]) == {"IMAGE"}
    json.dumps(vqa)  # valid JSON for --input-data


def test_input_data_refuses_other_models_and_no_images():
    with pytest.raises(ValueError, match="models"):
        PA.input_data("llm", [b"x"], "q", "", 1)
    with pytest.raises(ValueError, match="mode"):
        PA.input_data("vqa_sideways", [b"x"], "q", "", 1)
    with pytest.raises(ValueError, match="images"):
        PA.input_data("tokens_clip", [], "q", "", 1)


def test_config_validation_names_the_field():
    config = PA.PerfAnalyzerConfig("grpc://127.0.0.1:8001")
    assert config.triton_grpc == "127.0.0.1:8001" and config.models == ["vqa_interleaved"]
    assert config.question.startswith("Is the dog") and config.options and config.max_new_tokens == 8
    for bad, field in ((dict(triton_grpc="http://127.0.0.1:1"), "triton-url"), (dict(triton_grpc="host"), "triton-url"),
                       (dict(models=["preprocess"]), "models"), (dict(concurrency=[0]), "concurrency"),
                       (dict(images=0), "images"), (dict(request_count=0), "requests"),
                       (dict(stability_percent=0), "stability"), (dict(max_trials=0), "max-trials")):
        with pytest.raises(ValueError, match=field):
            PA.PerfAnalyzerConfig(**{"triton_grpc": "127.0.0.1:1", **bad})


def test_command_line_uses_count_windows_one_concurrency_and_the_csv(tmp_path):
    tool = PT.PerfAnalyzerTool(tmp_path / "bin" / "perf_analyzer", tmp_path / "lib")
    config = PA.PerfAnalyzerConfig("127.0.0.1:9", request_count=7, metrics_url="http://127.0.0.1:10/metrics")
    command = PA.command_line(tool, config, "vqa_clip", 4, tmp_path / "in.json", tmp_path / "out.csv")
    text = " ".join(command)
    assert command[0] == str(tool.binary)
    for part in ("-m vqa_clip", "-i grpc", "-u 127.0.0.1:9", "--concurrency-range 4:4",
                 "--measurement-mode count_windows", "--measurement-request-count 7", f"-f {tmp_path / 'out.csv'}",
                 "--verbose-csv", "--collect-metrics --metrics-url http://127.0.0.1:10/metrics", "--streaming"):
        assert part in text
    tokens = PA.command_line(tool, config, "tokens_clip", 4, tmp_path / "in.json", tmp_path / "out.csv")
    assert "--streaming" not in tokens  # only the vqa ensembles end in the decoupled llm
    env = tool.environment({"LD_LIBRARY_PATH": "/x"})
    assert env["LD_LIBRARY_PATH"].split(":") == [str(tmp_path / "lib"), "/x"]


def test_tools_are_cached_per_version_under_mofserve_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MOFSERVE_HOME", str(tmp_path))
    folder = PT.tool_dir()
    assert folder.parent == tmp_path / "tools"
    assert PT.TRITONCLIENT_VERSION in folder.name and PT.CUDART_VERSION in folder.name


def _section(tmp_path):
    rows = PA.parse_csv(VERBOSE.read_text())
    points = [{"tool": "perf_analyzer", "model": "tokens_clip", "error": None,
               "triton": {"models": {}, "feature_cache": {"clip_vision": {"hit": 9, "miss": 3}}},
               **row} for row in rows]
    points[1]["unstable"] = "no stable windows at 25%: rerun accepting any (100%)"
    points.append({"tool": "perf_analyzer", "model": "vqa_clip", "kind": "concurrency", "value": 4,
                   "error": "exit code 1: Failed to obtain stable measurement | try again"})
    config = PA.PerfAnalyzerConfig("127.0.0.1:9", models=["tokens_clip", "vqa_clip"])
    return {"tool": {"version": "Perf Analyzer Version 2.51.0", "tritonclient": "2.51.0"}, "config": vars(config),
            "images": {"per_point": 16, "fresh_per_point": True}, "points": points}


def test_table_shows_figures_cache_hits_and_failed_runs(tmp_path):
    table = format_perf_analyzer_table(_section(tmp_path))
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert lines[2].startswith("| tokens_clip | c=1 | 52.27 | 19.1 | 21.5 | 21.8 | 22.7 | 19.1 | 0.0 | 12.0 | 7.1 "
                               "| 9 / 3 |")
    assert lines[3].endswith("| UNSTABLE: no stable windows at 25%: rerun accepting any (100%) |")
    assert "| vqa_clip | c=4 |" in lines[4] and "Failed to obtain stable measurement / try again" in lines[4]
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_standalone_report_writes_markdown_json_and_plot(tmp_path):
    report = PA.build_report(_section(tmp_path), "127.0.0.1:9", "tiny")
    written = write_report(report, tmp_path / "out")
    assert {p.name for p in written} == {"report.json", "report.md", "perf_analyzer.png"}
    assert (tmp_path / "out" / "perf_analyzer.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["benchmark"] == "perf_analyzer" and len(data["perf_analyzer"]["points"]) == 3
    md = format_markdown(report)
    assert "perf_analyzer" in md and "| tokens_clip | c=2 | 100.38 |" in md and "tiny" in md
    assert "16 real-image JPEGs per point, never sent before" in md
    assert np.isfinite(data["perf_analyzer"]["points"][0]["throughput_rps"])
