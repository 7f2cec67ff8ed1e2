"""``bench load``'s token figures (TTFT, ITL, output and decode tokens/s), the targets' ratios and
MET / MISSED, and the tables they are printed in. Known data only: no server, no times asserted."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from mofserve.benchmarks import baselines as B
from mofserve.benchmarks import load as L
from mofserve.benchmarks import load_runner as LR
from mofserve.benchmarks import load_tables as LT
from mofserve.benchmarks import stats as S
from mofserve.benchmarks.report import build_report, format_markdown, write_report

from .test_bench_load import FakeImages, FakeTransport


def test_inter_token_gaps_spread_a_multi_token_message_over_its_tokens():
    assert S.inter_token_gaps([[100.0, 1], [110.0, 2], [130.0, 4], [130.0, 4]]) == [10.0, 10.0, 10.0]
    assert S.inter_token_gaps([[5.0, 1]]) == [] and S.inter_token_gaps([]) == []


def test_union_length_counts_overlaps_once():
    assert S.union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4.0)
    assert S.union_length([(3, 3), (2, 1)]) == 0.0 and S.union_length([]) == 0.0


def test_merged_and_overlap_length():
    assert S.merged([(3, 4), (0, 1), (0.5, 2), (5, 5)]) == [(0.0, 2.0), (3.0, 4.0)]
    assert S.overlap_length([(0, 2), (3, 4)], [(1, 3.5), (10, 11)]) == pytest.approx(1.5)
    assert S.overlap_length([], [(0, 1)]) == 0.0


def test_decode_figures_take_the_prefills_run_meanwhile_out():
    # two streams decode over [0, 4] with 20 tokens; a third request's prefill ran over [1, 2]
    out = S.decode_figures([(0.0, 4.0, 10), (0.0, 4.0, 10)], prefills=[(1.0, 2.0), (-2.0, 0.0)])
    assert out["prefill_within_decode_s"] == pytest.approx(1.0)
    assert out["decode_tokens_per_s"] == pytest.approx(20 / 3) and out["decode_tokens_per_s_with_prefills"] == 5.0


def test_decode_figures_one_stream_at_a_time_vs_streams_side_by_side():
    serial = S.decode_figures([(0.0, 1.0, 10), (1.0, 2.0, 10)])
    assert serial["decode_tokens_per_s"] == pytest.approx(10.0) and serial["decode_concurrency"] == pytest.approx(1.0)
    assert serial["decode_tokens_per_s_with_prefills"] == serial["decode_tokens_per_s"]  # no prefill given
    together = S.decode_figures([(0.0, 2.0, 10)] * 4)  # four streams decoding at once, each at 5 tokens/s
    assert together["decode_tokens_per_s"] == pytest.approx(20.0)
    assert together["decode_concurrency"] == pytest.approx(4.0) and together["decode_s"] == pytest.approx(2.0)
    assert math.isnan(S.decode_figures([])["decode_tokens_per_s"])


def _streamed(t_s, first, step, tokens, first_tokens=1, timings=None):
    deltas = [[first, first_tokens]]
    deltas += [[first + i * step, first_tokens + i] for i in range(1, tokens - first_tokens + 1)]
    record = {"t_s": t_s, "ok": True, "ms": deltas[-1][0], "completion_tokens": tokens, "deltas": deltas,
              "mode": "clip", "repeated": False, "code": None, "timings": timings or {}}
    record["ttft_ms"] = S.first_token_ms(record["ms"], deltas, record["timings"])
    return record


def test_first_token_from_the_first_message_or_from_the_servers_timings():
    assert S.first_token_ms(500.0, [[100.0, 1], [120.0, 2]], {}) == 100.0
    # the first message carried 3 tokens: the server's front-end saw its first token 380 ms before the end
    server = {"total_ms": 480.0, "time_to_first_token_ms": 100.0}
    assert S.first_token_ms(500.0, [[150.0, 3]], server) == pytest.approx(120.0)
    assert S.first_token_ms(500.0, None, server) == pytest.approx(120.0)  # no text at all, or unary Ask
    assert S.first_token_ms(500.0, [[150.0, 3]], {}) == 150.0 and S.first_token_ms(500.0, None, {}) is None


def test_token_summary_of_streamed_and_unary_records():
    server = {"total_ms": 240.0, "time_to_first_token_ms": 100.0, "prefill_ms": 50.0}
    records = [_streamed(0.0, 100.0, 20.0, 5), _streamed(1.0, 300.0, 40.0, 5, first_tokens=2, timings=server),
               {"t_s": 2.0, "ok": True, "ms": 50.0, "completion_tokens": 3, "mode": "clip", "repeated": False}]
    t = S.token_summary(records, elapsed_s=2.0)
    assert t["output_tokens"] == 13 and t["output_tokens_per_s"] == pytest.approx(6.5) and t["streamed"] == 2
    # the second's first token: 420 - (240 - 100) = 280 ms
    assert t["ttft_ms"]["n"] == 2 and t["ttft_ms"]["p50"] == pytest.approx(190.0)
    assert t["ttft_from_first_message"] == 1
    assert t["itl_ms"]["min"] == 20.0 and t["itl_ms"]["max"] == 40.0 and t["itl_ms"]["n"] == 4 + 3
    # decode phases [0.1, 0.18] (4 tokens) and [1.28, 1.42] (4 tokens); the second's prefill [1.23, 1.28]
    assert t["decode_tokens"] == 8 and t["decode_s"] == pytest.approx(0.22)
    assert t["decode_concurrency"] == pytest.approx(1.0) and t["prefill_within_decode_s"] == 0.0
    empty = S.token_summary([], elapsed_s=1.0)
    assert empty["output_tokens"] == 0 and math.isnan(empty["output_tokens_per_s"]) and empty["ttft_ms"]["n"] == 0


def _runner(transport, **config):
    images = FakeImages()
    images.ensure(4)
    return LR.LoadRunner(L.LoadConfig(L.parse_target("grpc://127.0.0.1:1"), progress=False, **config), transport,
                        images)


def test_streamed_answers_give_ttft_itl_and_decode_figures_per_point():
    runner = _runner(FakeTransport(delay=0.04, stream=True, tokens=5), concurrency=[1, 2], requests=6,
                     duration_s=None, warmup_s=0, mix={"clip": 1.0}, repeat_ratio=0.0)
    points = asyncio.run(runner.run())
    for point in points:
        t = point["tokens"]
        assert t["streamed"] == t["requests_counted"] == point["ok"] == 6 and t["output_tokens"] == 30
        assert 0 < t["ttft_ms"]["p50"] <= t["ttft_ms"]["p99"] and t["itl_ms"]["n"] == 6 * 4
        assert t["ttft_from_first_message"] == 6
        assert t["decode_tokens"] == 6 * 4 and t["decode_tokens_per_s"] > 0
        for r in point["records"]:
            assert r["ttft_ms"] == r["deltas"][0][0] and r["deltas"][-1][1] == r["completion_tokens"] == 5
            assert r["deltas"][-1][0] <= r["ms"] + 1e-6
        assert point["stages_ms"]["prefill_ms"] == 1.5 and point["stages_ms"]["decode_ms"] == 2.0
    assert points[1]["tokens"]["decode_concurrency"] >= points[0]["tokens"]["decode_concurrency"]


def test_the_cli_streams_by_default_and_http_never_streams():
    from mofserve.cli import build_parser

    args = build_parser().parse_args(["bench", "load", "--concurrency", "1", "8", "--extrapolate-layers", "32"])
    config = L.config_from_args(args)
    assert config.stream and config.extrapolate_layers == 32
    assert not L.config_from_args(build_parser().parse_args(["bench", "load", "--no-stream"])).stream
    assert not L.LoadConfig(L.parse_target("http://127.0.0.1:1"), stream=True).stream
    assert not L.LoadConfig(L.parse_target("grpc://127.0.0.1:1")).stream  # soak and fault tests: unary Ask
    with pytest.raises(ValueError, match="extrapolate-layers"):
        L.LoadConfig(L.parse_target("grpc://127.0.0.1:1"), extrapolate_layers=0)
    assert "eager-bf16" in B.BASELINES


def _point(value, rps, decode_tps=None, ttfts=(), ms=(100.0,)):
    records = [{"t_s": 0.0, "ok": True, "ms": m, "repeated": False, "mode": "clip", "code": None, "timings": {}}
               for m in ms]
    for record, ttft in zip(records, ttfts, strict=False):
        record["ttft_ms"] = ttft
    point = S.summarise_point(records, elapsed_s=1.0)
    point.update(kind="concurrency", value=value, throughput_rps=rps, records=records)
    point["tokens"]["decode_tokens_per_s"] = decode_tps
    point["tokens"]["decode_tokens_per_s_with_prefills"] = decode_tps / 2 if decode_tps else None
    return point


def _baseline(rps, p50, ttft=None):
    return {"throughput_rps": rps, "latency_ms": S.latency_summary([p50]), "label": "x", "runtime": "r",
            "precision": "fp32", "requests": 1, "load_s": 1.0, "stages_ms": {},
            "ttft_ms": S.latency_summary([ttft] if ttft is not None else [])}


def test_point_targets_decode_scaling_and_c4_vs_c1():
    points = [_point(1, 2.0, decode_tps=10.0), _point(4, 1.8, decode_tps=20.0), _point(8, 3.0, decode_tps=36.0)]
    t = B.point_targets(points)
    assert t["throughput_c4_vs_c1"]["value"] == pytest.approx(0.9) and t["throughput_c4_vs_c1"]["verdict"] == "MISSED"
    assert t["decode_scaling"]["value"] == pytest.approx(3.6) and t["decode_scaling"]["verdict"] == "MET"
    assert t["decode_scaling_with_prefills"]["value"] == pytest.approx(3.6)
    assert B.point_targets(points[:2])["decode_scaling"]["verdict"] is None  # no c=8 point
    assert B.point_targets([_point(1, 1.0), _point(4, 1.0)])["throughput_c4_vs_c1"]["verdict"] == "MET"  # >= 1


def test_ttft_ratio_uses_fresh_streamed_requests_at_c1_and_the_in_process_path():
    points = [_point(1, 2.0, ttfts=[90.0, 110.0, 130.0], ms=[200.0, 210.0, 220.0])]
    baselines = {"exported": _baseline(1.0, 200.0, ttft=100.0), "eager-bf16": _baseline(0.5, 400.0)}
    r = B.baseline_ratios(baselines, points)
    assert r["ttft_c1"]["value"] == pytest.approx(1.10) and r["ttft_c1"]["verdict"] == "MET"
    assert r["ttft_c1"]["streamed_requests"] == 3
    assert r["throughput_vs_eager_bf16"] == pytest.approx(4.0)
    missed = B.baseline_ratios({"exported": _baseline(1.0, 200.0, ttft=99.0)}, points)
    assert missed["ttft_c1"]["verdict"] == "MISSED"
    assert B.baseline_ratios({"exported": _baseline(1.0, 200.0)}, points)["ttft_c1"]["verdict"] is None


def test_target_rows_keep_the_order_and_say_which_profile_a_target_is_for():
    points = [_point(1, 2.0, decode_tps=10.0), _point(4, 2.5), _point(8, 3.0, decode_tps=20.0)]
    ratios = B.baseline_ratios({"eager": _baseline(1.0, 500.0)}, points)
    rows = B.target_rows(ratios, B.point_targets(points), "small")
    assert [r["key"] for r in rows] == ["throughput", "throughput_c4_vs_c1", "decode_scaling",
                                        "decode_scaling_with_prefills"]
    assert [r["this_profile"] for r in rows] == [True, True, False, False]
    assert rows[-1]["verdict"] == "MISSED" and rows[-1]["set_for"] == "paper-shaped"
    table = LT.format_targets(rows, "small")
    assert "| **MISSED** |" in table and "`paper-shaped` (this run: `small`)" in table


def _split_point(value, n=3):
    timings = {"preprocess_ms": 2.0, "encoders_ms": 100.0, "fusion_ms": 3.0, "llm_queue_ms": 1.0, "prefill_ms": 50.0,
               "decode_ms": 200.0, "llm_ms": 251.0, "total_ms": 360.0}
    records = [{"t_s": 0.0, "ok": True, "ms": 400.0, "ttft_ms": 170.0, "repeated": False, "mode": "additive",
                "code": None, "timings": dict(timings)} for _ in range(n)]
    point = S.summarise_point(records, elapsed_s=1.0)
    point.update(kind="concurrency", value=value, records=records)
    point["tokens"]["decode_concurrency"] = float(value)
    return point


def test_split_means_and_the_extrapolation_table():
    point = _split_point(1)
    s = LT.split_means(point)
    assert s["n"] == 3 and s["encoders_ms"] == 100.0 and s["pre_fusion_ms"] == 5.0
    assert s["rest_ms"] == pytest.approx(400.0 - 100.0 - 5.0 - 1.0 - 50.0 - 200.0) and s["ttft_ms"] == 170.0
    assert LT.split_means({"records": [{"ok": True, "ms": 1.0, "timings": {"llm_ms": 1.0}}]}) is None
    fit = {"measured_ms": {"1": 30.0, "2": 50.0, "4": 90.0}, "fixed_ms": 10.0, "per_layer_ms": 20.0,
           "fit_worst_error": 0.0, "layers": 32, "extrapolated_ms": 650.0}
    layers = {"layers": 32, "own_layers": 2, "depths": [1, 2, 4], "prompt_tokens": 640, "mode": "additive",
              "prefill": fit, "decode_step": {"1": fit, "8": fit},
              "factors": {"prefill": 650.0 / 50.0, "decode_step": {"1": 13.0, "8": 13.0}}}
    report = {"points": [point, _split_point(8)], "llm_layers": layers}
    table = LT.format_extrapolation(report)
    assert "Extrapolation, not a measurement" in table and "| c=1 (batch 1) | 50.0 -> 650.0 |" in table
    assert "| c=8 (batch 8) |" in table and "| prefill | 30.0 | 50.0 | 90.0 | 10.0 | 20.0 | 650.0 |" in table
    # request: 400 - 50 + 650 - 200 + 2600
    assert "| 400.0 -> 3400.0 |" in table
    assert LT.format_extrapolation({"points": []}) is None


def test_report_has_token_split_baseline_and_target_sections(tmp_path):
    config = L.LoadConfig(L.parse_target("grpc://127.0.0.1:1"), concurrency=[1, 4],
                          baselines=["eager", "eager-bf16", "exported"])
    points = [_point(1, 2.0, decode_tps=10.0, ttfts=[90.0], ms=[100.0]), _point(4, 2.5)]
    points[0]["tokens"].update(streamed=1, ttft_ms=S.latency_summary([90.0]), itl_ms=S.latency_summary([20.0]))
    baselines = {"eager": _baseline(1.0, 600.0), "eager-bf16": _baseline(1.5, 400.0),
                 "exported": _baseline(2.0, 100.0, ttft=80.0)}
    report = build_report(config, {"profile": "small"}, points, began=1.0, images=8, baselines=baselines)
    md = format_markdown(report)
    assert "TTFT p50 ms" in md and "| c=1 | 0 | - | 90.0 |" in md
    assert "## Targets (same run)" in md and "| throughput at c=4 / at c=1 | 1.25x | >= 1x | `small` | **MET** |" in md
    assert "eager bf16 in-process throughput | 1.67x" in md and "TTFT p50 at c=1, fresh images" in md
    write_report(report, tmp_path / "out", plots=False)
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [t["key"] for t in data["targets"]] == ["throughput", "p50_c1", "throughput_c4_vs_c1", "ttft_c1"]
