"""``mofserve bench load`` without a server: statistics, arrivals, the mode mix, image choice,
target parsing, the load loops against a fake transport, and report writing (JSON, Markdown, PNG)."""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter

import numpy as np
import pytest

from mofserve.benchmarks import baselines as B
from mofserve.benchmarks import load as L
from mofserve.benchmarks import load_runner as LR
from mofserve.benchmarks import serve_process as SP
from mofserve.benchmarks import stats as S
from mofserve.benchmarks import transports as TR
from mofserve.benchmarks import workload as W
from mofserve.benchmarks.report import format_markdown, stages_by_mode, stages_by_repeat, write_report

# ---- percentiles and summaries -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentiles_match_numpy_linear(n):
    values = np.random.default_rng(n).lognormal(3, 1, n).tolist()
    for q in (0, 1, 50, 90, 95, 99, 99.9, 100):
        assert S.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentiles_on_known_data():
    values = list(range(1, 101))  # 1..100
    assert S.percentile(values, 50) == pytest.approx(50.5)
    assert S.percentile(values, 90) == pytest.approx(90.1)
    assert S.percentile(values, 99) == pytest.approx(99.01)
    assert S.percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError):
        S.percentile([], 50)
    with pytest.raises(ValueError):
        S.percentile([1.0], 101)


def test_latency_summary_and_empty_summary():
    summary = S.latency_summary([10.0, 20.0, 30.0, 40.0])
    assert summary["n"] == 4 and summary["mean"] == 25.0 and summary["min"] == 10.0 and summary["max"] == 40.0
    assert summary["p50"] == 25.0 and summary["p99"] == pytest.approx(np.percentile([10, 20, 30, 40], 99))
    empty = S.latency_summary([])
    assert empty["n"] == 0 and math.isnan(empty["p50"]) and math.isnan(empty["max"])


# ---- Poisson arrivals ----------------------------------------------------------------------------


def test_poisson_arrivals_have_the_right_mean_rate_and_are_seeded():
    arrivals = S.poisson_arrivals(5.0, count=20000, seed=1)
    gaps = np.diff([0.0, *arrivals])
    assert len(arrivals) == 20000 and np.all(gaps > 0)
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)
    assert gaps.std() == pytest.approx(0.2, rel=0.05)  # exponential: std == mean
    assert S.poisson_arrivals(5.0, count=50, seed=1) == arrivals[:50]
    assert S.poisson_arrivals(5.0, count=50, seed=2) != arrivals[:50]


def test_poisson_arrivals_bounded_by_duration_and_count():
    within = S.poisson_arrivals(10.0, duration=100.0, seed=3)
    assert all(0 < t < 100.0 for t in within)
    assert len(within) == pytest.approx(1000, rel=0.1)
    assert len(S.poisson_arrivals(10.0, duration=100.0, count=7, seed=3)) == 7
    assert S.poisson_arrivals(0.001, duration=1.0, count=7, seed=3) == []
    for bad in (dict(rate=0, count=3), dict(rate=1.0)):
        with pytest.raises(ValueError):
            S.poisson_arrivals(**bad)


# ---- mode mix ------------------------------------------------------------------------------------


def test_parse_mix_normalises_and_validates():
    assert S.parse_mix("interleaved=0.4,additive=0.4,clip=0.2") == pytest.approx(
        {"interleaved": 0.4, "additive": 0.4, "clip": 0.2})
    assert S.parse_mix("clip=2, dinov2=2") == {"clip": 0.5, "dinov2": 0.5}
    assert S.parse_mix("clip") == {"clip": 1.0}
    assert S.parse_mix("clip=1,dinov2=0") == {"clip": 1.0}
    for bad in ("bogus=1", "clip=x", "clip=-1", "clip=0", ""):
        with pytest.raises(ValueError, match="mix"):
            S.parse_mix(bad)


def test_sample_modes_follows_the_mix_and_the_seed():
    mix = S.parse_mix(S.DEFAULT_MIX)
    drawn = S.sample_modes(mix, 20000, np.random.default_rng(0))
    counts = Counter(drawn)
    for mode, weight in mix.items():
        assert counts[mode] / len(drawn) == pytest.approx(weight, abs=0.015)
    assert S.sample_modes(mix, 30, np.random.default_rng(5)) == S.sample_modes(mix, 30, np.random.default_rng(5))


# ---- repeated images -----------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.7, 1.0])
def test_image_picker_repeats_the_given_share(ratio):
    picker = S.ImagePicker(100000, ratio, seed=4)
    picks = [picker.pick() for _ in range(5000)]
    repeated = [r for _, r in picks]
    assert repeated[0] is False  # nothing was sent before the first
    assert sum(repeated) / len(picks) == pytest.approx(ratio, abs=0.03)
    seen: set[int] = set()
    for index, was_repeated in picks:  # `repeated` is exactly "sent before"
        assert was_repeated == (index in seen)
        seen.add(index)


def test_image_picker_wraps_around_a_small_pool_and_reports_it_as_repeats():
    picker = S.ImagePicker(3, 0.0, seed=0)
    assert [picker.pick() for _ in range(5)] == [(0, False), (1, False), (2, False), (0, True), (1, True)]
    picker.size = 5  # the pool grew: fresh images again
    assert [picker.pick() for _ in range(3)] == [(3, False), (4, False), (2, True)]
    with pytest.raises(ValueError):
        S.ImagePicker(1, 1.5)


# ---- point summary -------------------------------------------------------------------------------


def _record(ms, mode="clip", ok=True, code=None, repeated=False, llm=5.0):
    timings = {"preprocess_ms": 1.0, "clip_ms": 2.0, "dinov2_ms": 0.0, "encoders_ms": 2.0, "fusion_ms": 0.5,
               "llm_ms": llm, "total_ms": 9.0} if ok else None
    return {"t_s": 0.0, "mode": mode, "image": 0, "repeated": repeated, "ok": ok, "code": code,
            "ms": ms, "timings": timings}


def test_summarise_point_counts_errors_throughput_and_stages():
    records = [_record(10.0), _record(20.0, mode="interleaved", llm=7.0, repeated=True),
               _record(5.0, ok=False, code="UNAVAILABLE"), _record(None, ok=False, code="client_overload"),
               _record(6.0, ok=False, code="UNAVAILABLE")]
    point = S.summarise_point(records, elapsed_s=4.0)
    assert point["requests"] == 5 and point["ok"] == 2 and point["errors"] == 3
    assert point["errors_by_code"] == {"UNAVAILABLE": 2, "client_overload": 1}
    assert point["throughput_rps"] == 0.5
    assert point["latency_ms"]["n"] == 2 and point["latency_ms"]["p50"] == 15.0
    assert point["stages_ms"]["llm_ms"] == 6.0 and point["stages_ms_by_mode"]["interleaved"]["llm_ms"] == 7.0
    assert point["stages_ms_by_repeat"]["repeated"]["llm_ms"] == 7.0
    assert point["repeated_share"] == pytest.approx(0.2)
    assert point["modes"] == {"clip": 4, "interleaved": 1}


# ---- configuration -------------------------------------------------------------------------------


def test_parse_target():
    assert L.parse_target("grpc://127.0.0.1:50051") == L.Target("grpc", "127.0.0.1:50051")
    assert L.parse_target("http://localhost:8080") == L.Target("http", "localhost:8080")
    assert L.parse_target("127.0.0.1:50051").scheme == "grpc"
    assert L.parse_target("http://[::1]:8080").address == "[::1]:8080"
    for bad in ("https://x:1", "grpc://x", "http://x:1/v1"):
        with pytest.raises(ValueError, match="target"):
            L.parse_target(bad)


def test_load_config_defaults_and_bounds():
    target = L.parse_target("grpc://127.0.0.1:1")
    config = L.LoadConfig(target)
    assert config.concurrency == [1, 2, 4, 8] and config.duration_s == L.DEFAULT_DURATION_S
    by_count = L.LoadConfig(target, concurrency=[2], duration_s=None, requests=10)
    assert by_count.duration_s is None and by_count.time_cap_s == L.MAX_POINT_S  # never unbounded
    assert L.LoadConfig(target, rates=[1.0]).concurrency == []
    for bad in (dict(concurrency=[0]), dict(rates=[-1.0]), dict(duration_s=0), dict(duration_s=1e6),
                dict(requests=0), dict(repeat_ratio=2.0), dict(warmup_s=-1)):
        with pytest.raises(ValueError):
            L.LoadConfig(target, **bad)


def test_cli_arguments_build_the_config():
    from mofserve.cli import build_parser

    args = build_parser().parse_args(["bench", "load", "--target", "http://127.0.0.1:8080", "--concurrency", "1",
                                      "2", "--rate", "0.5", "--requests", "5", "--mix", "clip=1,additive=3",
                                      "--repeat-ratio", "0.5", "--options", ""])
    config = L.config_from_args(args)
    assert config.target.scheme == "http" and config.concurrency == [1, 2] and config.rates == [0.5]
    assert config.requests == 5 and config.duration_s is None and config.mix == {"clip": 0.25, "additive": 0.75}
    assert config.options == "" and args.func.__module__ == "mofserve.benchmarks.load"


def test_http_body_is_an_openai_chat_completion():
    target = L.parse_target("http://127.0.0.1:1")
    transport = TR.HttpTransport(target, L.LoadConfig(target), [b"jpegbytes"])
    body = transport.body(0, "additive")
    assert body["model"] == "mofserve-additive" and body["options"] == W.OPTIONS
    parts = body["messages"][0]["content"]
    assert parts[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")


# ---- the loops against a fake transport ----------------------------------------------------------


class FakeImages(list):
    def ensure(self, count):
        while len(self) < count:
            self.append(b"img%d" % len(self))


class FakeTransport:
    """``ask`` as the transports answer: the server's timings, the usage and (``stream``) when each
    streamed message arrived; ``tokens`` tokens, the first after half the delay."""

    def __init__(self, delay=0.01, fail_every=0, stream=False, tokens=4):
        self.delay, self.fail_every, self.calls = delay, fail_every, []
        self.stream, self.tokens = stream, tokens

    async def ask(self, index, mode):
        self.calls.append((index, mode))
        await asyncio.sleep(self.delay)
        if self.fail_every and len(self.calls) % self.fail_every == 0:
            raise TR.RequestFailed("UNAVAILABLE")
        out = {"timings": {"preprocess_ms": 1.0, "clip_ms": 2.0, "dinov2_ms": 3.0, "encoders_ms": 3.0,
                           "fusion_ms": 0.5, "llm_ms": 4.0, "total_ms": 9.0, "llm_queue_ms": 0.5, "prefill_ms": 1.5,
                           "decode_ms": 2.0, "time_to_first_token_ms": 6.0},
               "completion_tokens": self.tokens, "prompt_tokens": 10}
        if self.stream:
            first = self.delay * 500
            step = (self.delay * 1000 - first) / max(self.tokens - 1, 1)
            out["deltas"] = [[first + i * step, i + 1] for i in range(self.tokens)]
        return out


def _runner(transport, **config):
    target = L.parse_target("grpc://127.0.0.1:1")
    images = FakeImages()
    images.ensure(4)
    return LR.LoadRunner(L.LoadConfig(target, progress=False, **config), transport, images)


def test_closed_loop_keeps_c_requests_in_flight_and_stops_at_the_count():
    transport = FakeTransport(delay=0.02, fail_every=5)
    runner = _runner(transport, concurrency=[3], requests=12, duration_s=None, warmup_s=0.05,
                     mix={"clip": 0.5, "interleaved": 0.5}, repeat_ratio=0.5)
    points = asyncio.run(runner.run())
    (point,) = points
    assert point["kind"] == "concurrency" and point["requests"] == 12
    assert point["ok"] + point["errors"] == 12 and set(point["errors_by_code"]) <= {"UNAVAILABLE"}
    # 3 workers x 20 ms: 12 requests take ~4 rounds, ~80 ms; throughput near 3 / 0.02 = 150 (ok share)
    assert 0.06 < point["elapsed_s"] < 1.0
    assert set(point["modes"]) <= {"clip", "interleaved"} and point["stages_ms"]["llm_ms"] == 4.0
    assert all(r["ms"] >= 19 for r in point["records"])


def test_open_loop_follows_the_seeded_poisson_schedule_and_sheds_overload():
    transport = FakeTransport(delay=0.6)  # nothing finishes before the last arrival
    runner = _runner(transport, rates=[200.0], duration_s=0.3, warmup_s=0, max_in_flight=10, seed=7)
    (point,) = asyncio.run(runner.run())
    scheduled = S.poisson_arrivals(200.0, duration=0.3, seed=7 + 200000)
    assert point["requests"] == len(scheduled) and point["offered_rps"] == 200.0
    assert [round(r["t_s"], 9) for r in point["records"] if r["code"] == "client_overload"] == [
        round(t, 9) for t in scheduled[10:]]  # at most 10 in flight: every later arrival is shed
    assert point["ok"] == 10 and point["errors_by_code"] == {"client_overload": len(scheduled) - 10}


# ---- report --------------------------------------------------------------------------------------


def _fake_report(tmp_path):
    target = L.parse_target("grpc://127.0.0.1:1")
    config = L.LoadConfig(target, concurrency=[1, 2], rates=[5.0], duration_s=0.2, warmup_s=0, progress=False)
    images = FakeImages()
    images.ensure(8)
    runner = LR.LoadRunner(config, FakeTransport(delay=0.01), images)
    points = asyncio.run(runner.run())
    from mofserve.benchmarks.report import build_report

    return build_report(config, {"profile": "tiny", "random_weights": True}, points, began=1.0, images=8)


def test_report_writes_json_markdown_and_non_empty_pngs(tmp_path):
    report = _fake_report(tmp_path)
    written = write_report(report, tmp_path / "out")
    names = {p.name for p in written}
    assert names == {"report.json", "report.md", "latency_concurrency.png", "throughput_concurrency.png",
                     "latency_rate.png", "throughput_rate.png", "latency_cdf.png", "stages.png"}
    for path in written:
        assert path.is_file() and path.stat().st_size > 0
    for png in (p for p in written if p.suffix == ".png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["benchmark"] == "load" and data["server"]["profile"] == "tiny"
    assert [p["kind"] for p in data["points"]] == ["concurrency", "concurrency", "rate"]
    assert {"cpu_model", "usable_cpus"} <= set(data["machine"]) and "mofserve" in data["versions"]
    assert all(len(p["records"]) == p["requests"] for p in data["points"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| c=1 |" in md and "| c=2 |" in md and "| 5/s |" in md
    assert any(f"| {mode} |" in md for mode in ("clip", "additive", "interleaved"))


def test_stage_breakdown_per_mode_has_the_overhead():
    points = [{"records": [_record(20.0, mode="clip"), _record(30.0, mode="clip"), _record(5.0, ok=False)]}]
    stages = stages_by_mode(points)
    assert list(stages) == ["clip"] and stages["clip"]["n"] == 2
    assert stages["clip"]["client_ms"] == 25.0
    assert stages["clip"]["overhead_ms"] == pytest.approx(25.0 - (1.0 + 2.0 + 0.5 + 5.0))
    assert stages["clip"]["triton_other_ms"] == pytest.approx(9.0 - (1.0 + 2.0 + 0.5 + 5.0))
    assert stages["clip"]["frontend_ms"] == pytest.approx(25.0 - 9.0)
    points[0]["records"][1]["repeated"] = True
    assert set(stages_by_repeat(points)) == {"fresh", "repeated"}


def test_markdown_without_points_still_renders():
    report = {"target": "grpc://x:1", "created": "now", "server": {"profile": "tiny"}, "git_commit": None,
              "machine": {"cpu_model": "cpu", "usable_cpus": 2}, "load_average_end": [0, 0, 0],
              "config": {"mix": {"clip": 1.0}, "repeat_ratio": 0.3, "duration_s": 1.0, "requests": None,
                         "warmup_s": 0.0, "max_new_tokens": 8}, "points": [], "modes_stages_ms": {}}
    assert "| point |" in format_markdown(report)


# ---- Triton's metrics ----------------------------------------------------------------------------

PROM_BEFORE = """# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="llm",version="1"} 10
nv_inference_exec_count{model="llm",version="1"} 10
nv_inference_queue_duration_us{model="llm",version="1"} 1000
nv_inference_compute_infer_duration_us{model="llm",version="1"} 50000
nv_inference_request_success{model="fuse_clip",version="1"} 3
mofserve_encoder_cache_total{model="clip_vision",result="hit"} 1
mofserve_encoder_cache_total{model="clip_vision",result="miss"} 4
"""
PROM_AFTER = """nv_inference_request_success{model="llm",version="1"} 14
nv_inference_exec_count{model="llm",version="1"} 13
nv_inference_queue_duration_us{model="llm",version="1"} 9000
nv_inference_compute_input_duration_us{model="llm",version="1"} 400
nv_inference_compute_infer_duration_us{model="llm",version="1"} 90000
nv_inference_compute_output_duration_us{model="llm",version="1"} 0
nv_inference_request_duration_us{model="llm",version="1"} 100000
nv_inference_request_success{model="fuse_clip",version="1"} 3
mofserve_encoder_cache_total{model="clip_vision",result="hit"} 3
mofserve_encoder_cache_total{model="clip_vision",result="miss"} 5
process_cpu_seconds_total 7.5
"""


def test_parse_prometheus_reads_labels_and_plain_lines():
    parsed = S.parse_prometheus(PROM_AFTER + 'weird{a="x \\" y"} 2\nbroken{model="z"} nan-ish\n')
    assert parsed[("nv_inference_queue_duration_us", (("model", "llm"), ("version", "1")))] == 9000
    assert parsed[("process_cpu_seconds_total", ())] == 7.5
    assert parsed[("weird", (("a", 'x \\" y'),))] == 2
    assert not any(name == "broken" for name, _ in parsed)


def test_triton_delta_gives_per_request_queue_and_compute_and_cache_counts():
    delta = S.triton_delta(S.parse_prometheus(PROM_BEFORE), S.parse_prometheus(PROM_AFTER))
    assert list(delta["models"]) == ["llm"]  # fuse_clip had no request in between
    llm = delta["models"]["llm"]
    assert llm["requests"] == 4 and llm["executions"] == 3
    assert llm["queue_ms"] == pytest.approx(8000 / 4 / 1000)
    assert llm["compute_ms"] == pytest.approx((400 + 40000) / 4 / 1000)
    assert llm["request_ms"] == pytest.approx(100000 / 4 / 1000)  # counter absent before: from 0
    assert delta["feature_cache"] == {"clip_vision": {"hit": 2, "miss": 1}}


def test_triton_metrics_url_from_the_serve_log_and_the_ready_line():
    log = ("[mofserve.server.app] serving profile small: gRPC 127.0.0.1:1, HTTP http://127.0.0.1:2 (...), metrics "
           "http://127.0.0.1:2/metrics; Triton gRPC 127.0.0.1:3, Triton metrics http://127.0.0.1:4/metrics\n")
    assert SP.triton_metrics_url(log) == "http://127.0.0.1:4/metrics"
    assert SP.triton_metrics_url("nothing") is None
    assert SP.parse_ready("READY grpc=127.0.0.1:1 http=http://127.0.0.1:2") == {
        "grpc": "grpc://127.0.0.1:1", "http": "http://127.0.0.1:2"}
    assert SP.parse_ready("READY soon") is None and SP.parse_ready("hello") is None
    with pytest.raises(ValueError, match="triton-metrics"):
        L.LoadConfig(L.parse_target("grpc://127.0.0.1:1"), triton_metrics="127.0.0.1:4")


def test_triton_grpc_address_from_the_serve_log():
    log = ("[mofserve.server.app] serving profile small: gRPC 127.0.0.1:1, HTTP http://127.0.0.1:2 (...); "
           "Triton gRPC 127.0.0.1:3, Triton metrics http://127.0.0.1:4/metrics\n")
    assert SP.triton_grpc_address(log) == "127.0.0.1:3"
    assert SP.triton_grpc_address("nothing") is None


# ---- baselines in the same run -------------------------------------------------------------------


def test_baseline_config_is_validated_and_deduplicated():
    target = L.parse_target("grpc://127.0.0.1:1")
    config = L.LoadConfig(target, baselines=["eager", "exported", "eager"], baseline_requests=3)
    assert config.baselines == ["eager", "exported"] and config.baseline_requests == 3
    with pytest.raises(ValueError, match="baseline"):
        L.LoadConfig(target, baselines=["notebook"])
    with pytest.raises(ValueError, match="baseline-requests"):
        L.LoadConfig(target, baselines=["eager"], baseline_requests=0)


def test_cli_baseline_and_perf_analyzer_options():
    from mofserve.cli import build_parser

    args = build_parser().parse_args(["bench", "load", "--baseline", "eager", "exported", "--baseline-requests", "4",
                                      "--perf-analyzer", "vqa_clip", "--pa-requests", "5"])
    config = L.config_from_args(args)
    assert config.baselines == ["eager", "exported"] and config.baseline_requests == 4
    assert args.perf_analyzer == ["vqa_clip"] and args.pa_requests == 5
    pa = build_parser().parse_args(["bench", "perf-analyzer", "--triton-url", "127.0.0.1:8001", "--models",
                                    "tokens_clip", "--concurrency", "1", "3"])
    assert pa.func.__module__ == "mofserve.benchmarks.perf_analyzer" and pa.concurrency == [1, 3]


def test_baseline_plan_takes_the_first_images_and_modes_from_the_mix():
    config = L.LoadConfig(L.parse_target("grpc://127.0.0.1:1"), mix=S.parse_mix("clip=1,interleaved=1"),
                          baseline_requests=200, seed=4)
    plan = B.baseline_plan(config)
    assert [i for i, _ in plan] == list(range(200))  # the sweep's first fresh images
    counts = Counter(m for _, m in plan)
    assert set(counts) == {"clip", "interleaved"} and 70 < counts["clip"] < 130
    assert plan == B.baseline_plan(config)  # seeded


def _point(value, rps, ms_fresh, ms_repeated=()):
    records = [_record(ms) for ms in ms_fresh] + [_record(ms, repeated=True) for ms in ms_repeated]
    point = S.summarise_point(records, elapsed_s=1.0)
    point.update(kind="concurrency", value=value, throughput_rps=rps, records=records)
    return point


def _baseline(rps, p50):
    return {"throughput_rps": rps, "latency_ms": S.latency_summary([p50]), "label": "x", "runtime": "r",
            "precision": "fp32", "requests": 1, "load_s": 1.0, "stages_ms": {}}


def test_baseline_ratios_use_the_best_concurrency_and_fresh_images_at_c1():
    points = [_point(1, 2.0, [100.0, 110.0, 120.0], ms_repeated=[5.0, 5.0, 5.0, 5.0]), _point(2, 3.5, [150.0]),
              _point(4, 3.0, [300.0])]
    ratios = B.baseline_ratios({"eager": _baseline(1.5, 600.0), "exported": _baseline(2.5, 100.0)}, points)
    t, p = ratios["throughput"], ratios["p50_c1"]
    assert t["best_concurrency"] == 2 and t["value"] == pytest.approx(3.5 / 1.5) and t["verdict"] == "MET"
    # repeated images (cache hits at 5 ms) are left out of the c=1 p50: 110 / 100
    assert p["serving_p50_ms"] == 110.0 and p["fresh_requests"] == 3
    assert p["value"] == pytest.approx(1.10) and p["verdict"] == "MET"
    assert ratios["throughput_vs_exported"] == pytest.approx(3.5 / 2.5)
    assert ratios["p50_c1_all_vs_exported"] < 1.0  # what the cache would hide
    missed = B.baseline_ratios({"eager": _baseline(2.0, 600.0), "exported": _baseline(2.5, 90.0)}, points)
    assert missed["throughput"]["verdict"] == "MISSED" and missed["p50_c1"]["verdict"] == "MISSED"
    only_eager = B.baseline_ratios({"eager": _baseline(1.0, 600.0)}, points)
    assert only_eager["p50_c1"]["verdict"] is None and math.isnan(only_eager["p50_c1"]["value"])


def test_report_has_the_baseline_section_with_verdicts(tmp_path):
    from mofserve.benchmarks.report import build_report

    config = L.LoadConfig(L.parse_target("grpc://127.0.0.1:1"), concurrency=[1, 2], baselines=["eager", "exported"])
    points = [_point(1, 2.0, [100.0, 110.0, 120.0]), _point(2, 3.5, [150.0])]
    baselines = {"eager": _baseline(1.5, 600.0), "exported": _baseline(2.5, 100.0)}
    report = build_report(config, {"profile": "small"}, points, began=1.0, images=8, baselines=baselines)
    assert report["baselines"]["ratios"]["throughput"]["verdict"] == "MET"
    md = format_markdown(report)
    assert "## Baselines in the same run" in md and "| 2.33x | >= 2x | MET |" in md
    assert "| 1.10x | <= 1.15x | MET |" in md
    write_report(report, tmp_path / "out", plots=False)
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["baselines"]["ratios"]["p50_c1"]["value"] == pytest.approx(1.1)
