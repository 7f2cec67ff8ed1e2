"""Load in `make test`: `mofserve soak`'s own code, shortened: the tiny profile served by a real
`mofserve serve`, driven at concurrency 4 for a bounded time, with zero errors and every process's
RSS within the stated tolerance (docs/reliability.md, "Load and soak"). The long run is `make soak`."""

from __future__ import annotations

import json

import pytest

from mofserve.benchmarks.soak import RssTolerance, SoakConfig, rss_growth, soak_service, verdict

pytestmark = pytest.mark.integration

MIB = 1 << 20
MODELS_WITH_STUBS = ("preprocess", "clip_vision", "dinov2_vision", "fuse_clip", "fuse_dinov2", "fuse_additive",
                     "fuse_interleaved", "llm", "tokenize_text", "clip_text")


def test_rss_tolerance_is_the_larger_of_the_floor_and_the_ratio():
    tolerance = RssTolerance(mib=64, ratio=0.25)
    assert tolerance.allowed_bytes(100 * MIB) == 64 * MIB
    assert tolerance.allowed_bytes(400 * MIB) == 100 * MIB


def test_verdict_names_a_grown_process_and_a_vanished_one():
    rows = rss_growth({"front-end": 200 * MIB, "stub:llm": 400 * MIB, "tritonserver": 60 * MIB},
                      {"front-end": 300 * MIB, "stub:llm": 420 * MIB, "tritonserver": None}, RssTolerance(64, 0.25))
    report = {"load": {"errors": 0, "requests": 10, "ok": 10, "errors_by_code": {}}, "rss": rows, "replaced": []}
    problems = verdict(report)
    assert any(p.startswith("front-end: RSS 200.0 -> 300.0 MiB") for p in problems), problems
    assert any(p.startswith("tritonserver") and "process gone" in p for p in problems), problems
    assert not any(p.startswith("stub:llm") for p in problems)


def test_fixed_concurrency_load_has_no_errors_and_bounded_memory_in_every_process(tiny_repository, tmp_path):
    config = SoakConfig(profile="tiny", duration_s=15, concurrency=4, warmup_s=5, sample_every_s=5, images=64,
                        timeout_s=60, progress=False)
    report, written = soak_service(config, tmp_path)
    load = report["load"]
    print(f"\n[soak] {load['requests']} requests in {load['elapsed_s']:.1f} s at concurrency 4, errors "
          f"{load['errors_by_code']}; RSS growth MiB: "
          + ", ".join(f"{r['process']} {r['growth_mib']}" for r in report["rss"]))
    assert load["errors"] == 0, load["errors_by_code"]
    assert load["ok"] >= 20, "too few answers to say anything about memory"
    names = {row["process"] for row in report["rss"]}
    assert {"front-end", "tritonserver"} | {f"stub:{m}" for m in MODELS_WITH_STUBS} <= names
    assert verdict(report) == [], verdict(report)
    saved = json.loads((tmp_path / "soak.json").read_text())
    assert saved["load"]["requests"] == load["requests"]
    assert "**Verdict: pass**" in (tmp_path / "soak.md").read_text()
    assert len(written) == 2
