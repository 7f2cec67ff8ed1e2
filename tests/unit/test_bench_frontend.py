"""Pure helpers of ``mofserve bench frontend``: percentiles, targets, rounds, image variants,
analysis and tables. No server, model or export here; records are plain dicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mofserve.benchmarks import frontend_analysis as analysis
from mofserve.benchmarks import frontend_phases as phases
from mofserve.benchmarks import frontend_tables as tables
from mofserve.benchmarks import stats

# ---- statistics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0, 1, 25, 50, 75, 90, 99, 100])
def test_percentile_matches_numpy_linear(q):
    values = [12.0, 3.5, 7.25, 100.0, 41.0, 8.0, 8.0, 55.5, 0.5, 19.0, 23.0]
    assert stats.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edge_cases():
    assert stats.percentile([4.0], 99) == 4.0
    assert stats.percentile([1.0, 3.0], 50) == 2.0
    # p99 of 10 samples lies between the two largest
    values = list(range(1, 11))
    assert 9 < stats.percentile(values, 99) < 10
    with pytest.raises(ValueError, match="no values"):
        stats.percentile([], 50)
    with pytest.raises(ValueError, match="q must be"):
        stats.percentile([1.0], 101)


def test_latency_summary():
    s = analysis.LatencySummary.of([30.0, 10.0, 20.0])
    assert (s.n, s.p50, s.mean, s.min, s.max) == (3, 20.0, 20.0, 10.0, 30.0)
    assert s.p99 == pytest.approx(29.8)
    with pytest.raises(ValueError):
        analysis.LatencySummary.of([])


def test_ratio_and_targets():
    assert analysis.ratio(110.0, 100.0) == pytest.approx(1.1)
    assert math.isnan(analysis.ratio(1.0, 0.0))
    assert math.isnan(analysis.ratio(math.nan, 2.0))
    assert [analysis.compare_target(k) for k in (1, 2, 3, 4)] == [1.0, 1.25, 1.5, 1.75]
    with pytest.raises(ValueError):
        analysis.compare_target(0)
    assert analysis.meets(1.10, analysis.FRONTEND_TARGET) is True  # the limit itself is met
    assert analysis.meets(1.1001, analysis.FRONTEND_TARGET) is False
    assert analysis.meets(math.nan, 1.0) is None
    assert [analysis.verdict(x) for x in (True, False, None)] == ["MET", "MISSED", "n/a"]


def test_paired_differences_and_rotation():
    assert analysis.paired_differences([5.0, 7.0], [4.0, 9.0]) == [1.0, -2.0]
    with pytest.raises(ValueError):
        analysis.paired_differences([1.0], [])
    assert analysis.rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert analysis.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert analysis.rotated([], 3) == []
    # over len(items) rounds every item takes every position once
    firsts = {analysis.rotated(analysis.PATHS, r)[0] for r in range(len(analysis.PATHS))}
    assert firsts == set(analysis.PATHS)


# ---- modes, pairs, rounds ----------------------------------------------------------------------


def test_parse_modes():
    assert analysis.parse_modes(None) == ("interleaved", "additive", "clip", "dinov2")
    assert analysis.parse_modes(["clip", "clip", "dinov2"]) == ("clip", "dinov2")
    with pytest.raises(ValueError, match="unknown fusion mode"):
        analysis.parse_modes(["nope"])
    with pytest.raises(ValueError, match="at least one"):
        analysis.parse_modes([])


def test_compare_ks_and_second_mode_pairs():
    assert analysis.compare_ks(analysis.DEFAULT_MODES) == [2, 3, 4]
    assert analysis.compare_ks(["clip"]) == []
    assert analysis.second_mode_pairs(analysis.DEFAULT_MODES) == [
        ("interleaved", "additive"), ("interleaved", "clip"), ("interleaved", "dinov2")]
    # B's encoders must all have run for A: clip then dinov2 is not a "seen" image for dinov2
    assert analysis.second_mode_pairs(["clip", "dinov2", "additive"]) == []
    assert analysis.second_mode_pairs(["additive", "clip"]) == [("additive", "clip")]
    assert analysis.second_mode_pairs(["clip"]) == []


def test_default_rounds_and_image_count():
    assert analysis.default_rounds(8, 3) == (4, 6)
    assert analysis.default_rounds(10, 3) == (5, 6)
    assert analysis.default_rounds(1, 3) == (3, 3)
    assert analysis.default_rounds(8, 0) == (4, 0)
    with pytest.raises(ValueError):
        analysis.default_rounds(0, 3)
    # warm-up 4 + 8 x 4 modes x 3 paths + 4 x (1 ask + 3 compares) + 6 x 2
    assert analysis.images_needed(analysis.DEFAULT_MODES, 8, 4, 6) == 4 + 96 + 16 + 12
    assert analysis.default_requests("small") == 20 and analysis.default_requests("tiny") == 20
    assert analysis.default_rounds(20, 3) == (10, 12)


# ---- image variants ------------------------------------------------------------------------------


# ---- analysis and tables -------------------------------------------------------------------------


def _stages(llm: float, clip: float = 0.0, dino: float = 0.0, total: float = 0.0) -> dict:
    return {"preprocess_ms": 2.0, "clip_ms": clip, "dinov2_ms": dino, "fusion_ms": 1.0, "llm_ms": llm,
            "encoders_ms": max(clip, dino), "total_ms": total}


def _ask_records() -> list[dict]:
    records = []
    for r in range(4):
        for mode in ("interleaved", "clip"):
            records.append({"round": r, "mode": mode, "path": "frontend", "ms": 105.0 + r,
                            "stages": _stages(50.0, 30.0, 28.0)})
            records.append({"round": r, "mode": mode, "path": "direct", "ms": 100.0 + r,
                            "stages": _stages(50.0, 30.0, 28.0)})
            records.append({"round": r, "mode": mode, "path": "inprocess", "ms": 140.0 if mode == "interleaved"
                            else 90.0, "stages": _stages(50.0, 30.0, 28.0 if mode == "interleaved" else 0.0)})
    return records


def test_analyse_paths_ratios_verdicts_and_stages():
    paths = analysis.analyse_paths(_ask_records(), ["interleaved", "clip"])
    row = paths["interleaved"]
    assert row["summaries"]["frontend"]["p50"] == 106.5
    assert row["frontend_over_direct_p50"] == pytest.approx(106.5 / 101.5)
    assert row["paired_overhead_ms_median"] == pytest.approx(5.0)
    assert row["met"] is True
    assert row["frontend_over_inprocess_p50"] == pytest.approx(106.5 / 140.0)
    # Triton runs the encoders side by side (the slower counts), in-process one after the other
    assert row["stages"]["direct"]["stages_ms"] == pytest.approx(2 + 30 + 1 + 50)
    assert row["stages"]["inprocess"]["stages_ms"] == pytest.approx(2 + 58 + 1 + 50)
    assert row["stages"]["direct"]["other_ms"] == pytest.approx(101.5 - 83)
    slow = [dict(r, ms=r["ms"] * 1.5) if r["path"] == "frontend" else r for r in _ask_records()]
    assert analysis.analyse_paths(slow, ["clip"])["clip"]["met"] is False


def _compare_records() -> list[dict]:
    records = []
    for r in range(3):
        records.append({"kind": "ask", "k": 1, "round": r, "ms": 100.0, "stages": _stages(40.0, 50.0, 45.0)})
        for k in (2, 3):
            answers = [{"mode": "interleaved", "stages": _stages(40.0, 50.0, 45.0, 100.0)}]
            answers += [{"mode": "x", "stages": _stages(40.0, 1.0, 1.0, 40.0 * i)} for i in range(1, k)]
            records.append({"kind": "compare", "k": k, "round": r, "ms": 100.0 + 40.0 * (k - 1) + r,
                            "answers": answers})
    return records


def test_analyse_compare():
    compare = analysis.analyse_compare(_compare_records(), ["interleaved", "additive", "clip"])
    rows = {row["k"]: row for row in compare["rows"]}
    assert set(rows) == {2, 3}
    assert rows[2]["ratio"] == pytest.approx(1.41) and rows[2]["met"] is False
    assert rows[3]["ratio"] == pytest.approx(1.81) and rows[3]["target"] == 1.5
    assert rows[2]["first_encoders_ms_median"] == 50.0 and rows[2]["later_encoders_ms_median"] == 1.0
    assert rows[3]["later_llm_ms_median"] == 40.0
    fast = [dict(r, ms=110.0) if r["kind"] == "compare" else r for r in _compare_records()]
    assert all(row["met"] for row in analysis.analyse_compare(fast, ["interleaved", "additive", "clip"])["rows"])


def test_analyse_second_mode():
    records = []
    for r, pair in enumerate(["interleaved -> clip", "interleaved -> dinov2"] * 2):
        records.append({"kind": "cold_a", "pair": pair, "ms": 100.0, "stages": _stages(40.0, 50.0, 50.0)})
        records.append({"kind": "seen_b", "pair": pair, "ms": 20.0 + r, "stages": _stages(15.0, 0.5, 0.0)})
        records.append({"kind": "cold_b", "pair": pair, "ms": 100.0, "stages": _stages(15.0, 50.0, 0.0)})
    second = analysis.analyse_second_mode(records)
    assert second["ratio"] == pytest.approx((21.0 + 22.0) / 200.0) and second["met"] is True
    assert [p["pair"] for p in second["pairs"]] == ["interleaved -> clip", "interleaved -> dinov2"]
    assert second["pairs"][0]["seen_encoders_ms_median"] == 0.5
    assert analysis.analyse_second_mode([])["met"] is None


def _report() -> dict:
    modes = ["interleaved", "additive", "clip"]
    return {
        "machine": {"cpu_model": "Test CPU", "usable_cpus": 2}, "profile": "small", "max_new_tokens": 8,
        "requests": 4, "compare_rounds": 3, "second_rounds": 4,
        "load_average": {"start": [1.0, 1.0, 1.0], "end": [3.5, 2.0, 1.0]},
        "cpu": {"ask": {"others_cores": 0.8, "steal_cores": 0.0}},
        "paths": analysis.analyse_paths(_ask_records(), ["interleaved", "clip"]),
        "compare": analysis.analyse_compare(_compare_records(), modes),
        "second_mode": analysis.analyse_second_mode([]),
        "agreement": {"clip": {"agree": True, "chosen": {}, "answers": {}}},
    }


def test_format_report_tables_and_verdicts():
    text = tables.format_report(_report())
    assert "## Front-end overhead and Compare (CPU): profile small, Test CPU, 2 CPUs" in text
    assert "start: 1.0 -> end: 3.5 on 2 CPUs" in text
    assert "ask 0.80 (steal 0.00) -> contended" in text  # other processes took 0.8 of 2 cores
    latency = tables.format_latency_table(_report()["paths"])
    lines = latency.splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| interleaved | 106.5 |" in latency and "1.049x" in latency and "| MET |" in latency
    stages = tables.format_stage_table(_report()["paths"]).splitlines()
    assert len(stages) == 2 + 2 * 3 and all(line.count("|") == stages[0].count("|") for line in stages)
    compare = tables.format_compare_table(_report()["compare"]).splitlines()
    assert len(compare) == 4 and all(line.count("|") == compare[0].count("|") for line in compare)
    assert "<= 1.25x" in compare[2] and "MISSED" in compare[2]
    assert "front-end <= 1.10x the direct ensemble call (p50, every mode): worst 1.049x -> **MET**" in text
    assert "Compare over 3 modes <= 1.50x a cold Ask (p50): 1.81x -> **MISSED**" in text
    assert "second mode" not in text.split("### Targets")[1]  # nothing measured, no verdict line
    assert "agree in every mode" in text


def test_format_verdicts_notes_a_profile_other_than_small():
    r = _report()
    line = tables.format_verdicts(r["paths"], r["compare"], r["second_mode"], "tiny")
    assert "the target is set for `small`" in line


# ---- CPU used by other processes -----------------------------------------------------------------


def test_format_cpu_line():
    quiet = {"ask": {"others_cores": 0.1, "steal_cores": 0.0}}
    busy = {"ask": {"others_cores": 0.1, "steal_cores": 0.0}, "compare": {"others_cores": 0.9, "steal_cores": 0.1}}
    assert tables.format_cpu_line(quiet, 2).endswith("-> quiet.")
    assert "compare 0.90 (steal 0.10)" in tables.format_cpu_line(busy, 2)
    assert tables.format_cpu_line(busy, 2).endswith("-> contended.")
    assert "not measured" in tables.format_cpu_line({}, 2)


def test_second_mode_ratio_against_cold_a():
    records = [{"kind": "cold_a", "pair": "interleaved -> clip", "ms": 200.0, "stages": _stages(1.0)},
               {"kind": "seen_b", "pair": "interleaved -> clip", "ms": 50.0, "stages": _stages(1.0)},
               {"kind": "cold_b", "pair": "interleaved -> clip", "ms": 100.0, "stages": _stages(1.0)}]
    second = analysis.analyse_second_mode(records)
    assert second["ratio"] == 0.5 and second["ratio_vs_cold_a"] == 0.25 and second["met"] is False
    assert "Against the cold Ask of A itself (p50 200.0 ms" in tables.format_second_mode_table(second)


def _run_report(offset: float) -> dict:
    modes = ["interleaved", "additive", "clip"]
    ask = [dict(r, ms=r["ms"] + offset) for r in _ask_records()]
    return {"benchmark": "frontend", "machine": {"cpu_model": "Test CPU", "usable_cpus": 2}, "profile": "small",
            "modes": modes, "max_new_tokens": 8, "requests": 4, "compare_rounds": 3, "second_rounds": 0,
            "load_average": {"start": [1.0, 1.0, 1.0]}, "cpu": {"ask": {"others_cores": 0.1, "steal_cores": 0.0}},
            "agreement": {"clip": {"agree": True, "chosen": {}, "answers": {}}},
            "records": {"ask": ask, "compare": _compare_records(), "second_mode": []}}


def test_pool_reports_merges_records_and_keeps_rounds_apart():
    pooled = analysis.pool_reports([_run_report(0.0), _run_report(100.0)])
    assert pooled["requests"] == 8 and pooled["compare_rounds"] == 6
    row = pooled["paths"]["interleaved"]
    assert row["summaries"]["frontend"]["n"] == 8
    # front-end and direct requests of the same round of the same run are paired: still 5 ms apart
    assert row["paired_overhead_ms_median"] == pytest.approx(5.0)
    assert len({r["round"] for r in pooled["records"]["ask"]}) == 8
    assert set(pooled["load_average"]) == {"run 1 start", "run 2 start"}
    assert "(pooled from 2 runs)" in tables.format_report(pooled)
    other = dict(_run_report(0.0), profile="tiny")
    with pytest.raises(ValueError, match="differ"):
        analysis.pool_reports([_run_report(0.0), other])
    with pytest.raises(ValueError):
        analysis.pool_reports([])


def test_time_budget_helpers(monkeypatch):
    monkeypatch.setattr(phases.time, "monotonic", lambda: 100.0)
    assert phases.out_of_time(None, 50) is False
    assert phases.out_of_time(99.0, 2) is False  # fewer than MIN_ROUNDS: go on
    assert phases.out_of_time(99.0, 3) is True
    assert phases.out_of_time(101.0, 3) is False
    assert phases.out_of_time(99.0, 3, min_rounds=4) is False
    assert phases.phase_deadline("ask", 0.0, None) is None
    assert phases.phase_deadline("ask", 0.0, 100.0) == pytest.approx(55.0)
    # the compare phase starting at 40 (the Ask phase used less than its share) gets 28/45 of the rest
    assert phases.phase_deadline("compare", 40.0, 100.0) == pytest.approx(40 + 60 * 28 / 45)
    assert phases.phase_deadline("second_mode", 90.0, 100.0) == pytest.approx(100.0)
    assert phases.phase_deadline("second_mode", 120.0, 100.0) == pytest.approx(120.0)  # already late


def test_format_report_says_when_the_budget_cut_rounds():
    r = dict(_report(), planned={"requests": 20, "compare_rounds": 3, "second_rounds": 4})
    text = tables.format_report(r)
    assert "4 timed requests per mode and path (the time budget cut the run: 4 of 20 requests)" in text


def test_second_mode_overall_ratio_weighs_pairs_alike():
    records = []
    for pair, seen, cold, n in (("a -> b", 50.0, 100.0, 1), ("a -> c", 50.0, 400.0, 5)):
        for _ in range(n):  # the second pair has more samples: it must not count more
            records.append({"kind": "seen_b", "pair": pair, "ms": seen, "stages": _stages(1.0)})
            records.append({"kind": "cold_b", "pair": pair, "ms": cold, "stages": _stages(1.0)})
    second = analysis.analyse_second_mode(records)
    assert second["ratio"] == pytest.approx(100.0 / 500.0)
    table = tables.format_second_mode_table(second)
    assert "| **all pairs** (sums of the pairs' p50s) | 100.0 | 500.0 | 0.20x |" in table
