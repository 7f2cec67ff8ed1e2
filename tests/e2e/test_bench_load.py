"""``mofserve bench load`` end to end on the tiny profile: the gRPC and HTTP front-ends run in-process
on ``loop_thread``'s loop (as in ``mofserve serve``) over the session's real Triton; short sweeps
with a fusion-mode mix and repeated images, then the report's content and files are checked.

The load runs on the same loop as the servers (grpc.aio wants one loop per process); the images
are made beforehand in this thread, so nothing blocks the loop during the timed phases.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mofserve.benchmarks.load import LoadConfig, parse_target, run_load
from mofserve.benchmarks.report import format_markdown, write_report
from mofserve.benchmarks.workload import ImagePool
from mofserve.server.grpc_service import build_grpc_server
from mofserve.server.http_api import build_http_app, start_http

pytestmark = pytest.mark.integration

STAGES = {"preprocess_ms", "clip_ms", "dinov2_ms", "encoders_ms", "fusion_ms", "llm_ms", "total_ms"}
MIX = {"interleaved": 0.4, "additive": 0.4, "clip": 0.2}


@pytest.fixture(scope="module")
def servers(loop_thread, engine, metrics):
    async def start():
        server, port, _ = build_grpc_server(engine, metrics, port=0)
        await server.start()
        runner, http_port = await start_http(build_http_app(engine, metrics), port=0)
        return server, port, runner, http_port

    server, port, runner, http_port = loop_thread.run(start())
    yield SimpleNamespace(grpc=f"grpc://127.0.0.1:{port}", http=f"http://127.0.0.1:{http_port}")
    loop_thread.run(runner.cleanup())
    loop_thread.run(server.stop(None))


@pytest.fixture(scope="module")
def images():
    pool = ImagePool()
    pool.ensure(120)
    return pool


def test_grpc_concurrency_sweep_with_mix_and_repeats_writes_a_full_report(servers, images, loop_thread, tmp_path,
                                                                          tiny_triton):
    config = LoadConfig(parse_target(servers.grpc), concurrency=[1, 2], duration_s=3.0, warmup_s=0.5, mix=MIX,
                        repeat_ratio=0.5, max_new_tokens=4, timeout_s=30, seed=3, progress=False,
                        triton_metrics=tiny_triton.metrics_url)
    report = loop_thread.run(run_load(config, images=images), timeout=90)

    assert report["transport"] == "grpc" and report["server"]["profile"] == "tiny"
    assert report["server"]["random_weights"] and report["server"]["health"] == "SERVING"
    points = report["points"]
    assert [(p["kind"], p["value"]) for p in points] == [("concurrency", 1), ("concurrency", 2)]
    for p in points:
        assert p["errors"] == 0 and p["errors_by_code"] == {}, p["errors_by_code"]
        assert p["requests"] == p["ok"] == len(p["records"]) == p["latency_ms"]["n"] >= 5
        assert sum(p["modes"].values()) == p["requests"] and set(p["modes"]) <= set(MIX)
        assert p["throughput_rps"] > 0 and 2.5 < p["elapsed_s"] < 3.0 + 30
        lat = p["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert set(p["stages_ms"]) >= STAGES and p["stages_ms"]["llm_ms"] > 0
        assert all(r["ok"] and r["ms"] > 0 and set(r["timings"]) >= STAGES for r in p["records"])
        assert 0 < p["repeated_share"] < 1
        # Triton's metrics over the timed phase: the llm served about every request (Triton counts a
        # request when it releases it, which can come just after the answer, so the last ones may be
        # missing), the encoders' cache saw misses
        models = p["triton"]["models"]
        assert models["llm"]["requests"] >= p["requests"] - 2 and models["llm"]["compute_ms"] > 0
        assert sum(models.get(f"vqa_{m}", {}).get("requests", 0) for m in p["modes"]) >= p["requests"] - 2
        assert p["triton"]["feature_cache"]["clip_vision"]["miss"] > 0
    # fresh and repeated images are both sent, and told apart in the report
    assert all(set(p["stages_ms_by_repeat"]) == {"fresh", "repeated"} for p in points)
    by_repeat = report["repeat_stages_ms"]
    assert set(by_repeat) == {"fresh", "repeated"}
    assert by_repeat["fresh"]["n"] + by_repeat["repeated"]["n"] == sum(p["ok"] for p in points)
    assert set(report["modes_stages_ms"]) <= set(MIX) and "interleaved" in report["modes_stages_ms"]
    assert all(m["overhead_ms"] > -1 for m in report["modes_stages_ms"].values())
    assert report["machine"]["usable_cpus"] >= 1 and report["versions"]["mofserve"]

    written = write_report(report, tmp_path / "out")
    for path in written:
        assert path.stat().st_size > 0
    assert {p.name for p in written} == {"report.json", "report.md", "latency_concurrency.png",
                                         "throughput_concurrency.png", "latency_cdf.png", "stages.png"}
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sum(p["ok"] for p in data["points"]) == sum(len(p["records"]) for p in report["points"])
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| c=2 |" in markdown and "| c=1 | llm |" in markdown


def test_http_open_loop_point(servers, images, loop_thread):
    config = LoadConfig(parse_target(servers.http), rates=[4.0], duration_s=2.0, warmup_s=0, mix={"clip": 1.0},
                        repeat_ratio=0.3, max_new_tokens=4, timeout_s=30, seed=5, progress=False)
    report = loop_thread.run(run_load(config, images=images), timeout=60)
    (point,) = report["points"]
    assert report["transport"] == "http" and report["server"]["profile"] == "tiny"
    assert point["kind"] == "rate" and point["offered_rps"] == 4.0
    assert point["requests"] >= 2 and point["errors"] == 0, point["errors_by_code"]
    assert point["modes"] == {"clip": point["requests"]} and point["stages_ms"]["llm_ms"] > 0
    assert point["stages_ms"]["dinov2_ms"] == 0  # clip mode runs CLIP's encoder only


def test_a_streamed_sweep_reports_ttft_itl_tokens_and_the_llm_split(servers, images, loop_thread):
    config = LoadConfig(parse_target(servers.grpc), concurrency=[1, 4], duration_s=3.0, warmup_s=0.5,
                        mix={"additive": 1.0}, repeat_ratio=0.0, max_new_tokens=6, options="", timeout_s=30, seed=7,
                        progress=False, stream=True)
    report = loop_thread.run(run_load(config, images=images), timeout=120)
    for p in report["points"]:
        assert p["errors"] == 0, p["errors_by_code"]
        t = p["tokens"]
        # the tiny LM's random tokens are often whitespace, whose text the server holds back: an answer
        # may stream no message at all, and then its first token's time comes from the server's timings
        assert t["requests_counted"] == t["ttft_ms"]["n"] == p["ok"] >= 3 and t["streamed"] <= p["ok"]
        assert 0 < t["output_tokens"] <= 6 * p["ok"] and t["output_tokens_per_s"] > 0
        assert 0 < t["ttft_ms"]["p50"] <= t["ttft_ms"]["p99"] <= p["latency_ms"]["max"]
        for r in p["records"]:
            assert 0 < r["ttft_ms"] <= r["ms"] and 1 <= r["completion_tokens"] <= 6
            if r.get("deltas"):
                assert r["deltas"][-1][1] <= r["completion_tokens"] and r["deltas"][-1][0] <= r["ms"]
                if r["deltas"][0][1] == 1:
                    assert r["ttft_ms"] == r["deltas"][0][0]
            assert {"prefill_ms", "decode_ms", "llm_queue_ms", "time_to_first_token_ms"} <= set(r["timings"])
        assert p["stages_ms"]["prefill_ms"] > 0
    markdown = format_markdown(report)
    assert "TTFT p50 ms" in markdown and "| prefill | decode |" in markdown
    assert "## Targets (same run)" in markdown and "throughput at c=4 / at c=1" in markdown


def test_baselines_run_before_the_sweep_on_the_same_images_with_ratios(servers, images, loop_thread, tiny_triton):
    config = LoadConfig(parse_target(servers.grpc), concurrency=[1, 2], duration_s=2.0, warmup_s=0,
                        mix={"interleaved": 0.5, "clip": 0.5}, repeat_ratio=0.0, max_new_tokens=4, timeout_s=30,
                        seed=11, progress=False, baselines=["eager", "eager-bf16", "exported"], baseline_requests=3,
                        stream=True)
    report = loop_thread.run(run_load(config, images=images), timeout=240)

    runs = report["baselines"]["runs"]
    assert list(runs) == ["eager", "eager-bf16", "exported"]
    assert (runs["eager"]["runtime"], runs["eager"]["precision"]) == ("pytorch", "fp32")
    assert (runs["eager-bf16"]["runtime"], runs["eager-bf16"]["precision"]) == ("pytorch", "bf16")
    # the exported path answers through the LM's engine: its time to the first token is measured
    assert 0 < runs["exported"]["ttft_ms"]["p50"] <= runs["exported"]["latency_ms"]["max"]
    assert runs["exported"]["stages_ms"]["prefill_ms"] > 0
    assert runs["exported"]["runtime"] == "onnxruntime" and runs["exported"]["profile"] == "tiny"
    plan = [(r["image"], r["mode"]) for r in runs["eager"]["records"]]
    assert plan == [(r["image"], r["mode"]) for r in runs["exported"]["records"]] and len(plan) == 3
    assert [i for i, _ in plan] == [0, 1, 2]
    for run in runs.values():
        assert run["requests"] == 3 and run["throughput_rps"] > 0 and run["load_s"] > 0
        lat = run["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["max"]
        assert run["stages_ms"]["llm_ms"] > 0 and run["stages_ms"]["clip_ms"] > 0
        assert all(r["chosen"] in ("a", "b") for r in run["records"])
    # tiny serves fp32 everywhere: the eager and exported pipelines choose the same options
    assert [r["chosen"] for r in runs["eager"]["records"]] == [r["chosen"] for r in runs["exported"]["records"]]
    # the sweep then sends the same images first (fresh: the server never saw them)
    c1 = report["points"][0]
    assert [r["image"] for r in c1["records"][:3]] == [0, 1, 2] and not any(r["repeated"] for r in c1["records"])

    ratios = report["baselines"]["ratios"]
    best = max(p["throughput_rps"] for p in report["points"])
    assert ratios["throughput"]["value"] == pytest.approx(best / runs["eager"]["throughput_rps"])
    assert ratios["throughput"]["verdict"] in ("MET", "MISSED") and ratios["p50_c1"]["verdict"] in ("MET", "MISSED")
    assert ratios["p50_c1"]["fresh_requests"] == c1["ok"]
    assert ratios["p50_c1"]["value"] == pytest.approx(c1["latency_ms"]["p50"] / runs["exported"]["latency_ms"]["p50"])
    assert ratios["ttft_c1"]["verdict"] in ("MET", "MISSED") and ratios["throughput_vs_eager_bf16"] > 0
    markdown = format_markdown(report)
    assert "## Baselines in the same run" in markdown and "eager (eager PyTorch fp32)" in markdown
    assert "eager-bf16 (eager PyTorch bf16)" in markdown
