"""The pure part of ``mofserve bench frontend`` (``benchmarks/frontend.py``): what it measures
against (paths, modes, targets), how many rounds and images a run plans, and the analysis of the
recorded samples (latency summaries, ratios, MET / MISSED, per-stage medians, pooling of several
runs' reports). It holds no server, model or clock, so the unit tests run it on plain dicts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .pipelines import ENCODERS, STAGES
from .stats import percentile

DEFAULT_MODES = ("interleaved", "additive", "clip", "dinov2")
PATHS = ("frontend", "direct", "inprocess")
DEFAULT_REQUESTS = {"tiny": 20, "small": 20, "paper": 3}  # per mode and path; see default_requests
FRONTEND_TARGET = 1.10  # front-end p50 <= 1.10 x the direct ensemble call's p50 (on `small`)
SECOND_MODE_TARGET = 0.25  # a second mode on a seen image <= 0.25 x a cold Ask


# --------------------------------------------------------------------------------------------
# Statistics, targets, rounds


@dataclass(frozen=True)
class LatencySummary:
    n: int
    p50: float
    p99: float
    mean: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> LatencySummary:
        if not values:
            raise ValueError("LatencySummary: no values")
        return cls(len(values), percentile(values, 50), percentile(values, 99), statistics.fmean(values),
                   min(values), max(values))


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN when the denominator is not positive (nothing to compare with)."""
    if not denominator > 0 or math.isnan(numerator):
        return math.nan
    return numerator / denominator


def compare_target(k: int) -> float:
    """The Compare target over k modes: one cold Ask plus a quarter of one per extra mode."""
    if k < 1:
        raise ValueError(f"compare_target: k must be positive, got {k}")
    return 1.0 + 0.25 * (k - 1)


def meets(value: float, limit: float) -> bool | None:
    """Whether ``value <= limit``; None when the value could not be measured (NaN)."""
    if value is None or math.isnan(value):
        return None
    return value <= limit


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("MET" if met else "MISSED")


def paired_differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """a[i] - b[i] for requests measured side by side in the same round."""
    if len(a) != len(b):
        raise ValueError(f"paired_differences: {len(a)} vs {len(b)} values")
    return [x - y for x, y in zip(a, b, strict=True)]


def rotated(items: Sequence, shift: int) -> list:
    """``items`` rotated left by ``shift`` (the order changes from round to round)."""
    if not items:
        return []
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def parse_modes(modes: Iterable[str] | None) -> tuple[str, ...]:
    """Validated fusion modes in the given order, duplicates dropped; None gives the defaults."""
    if modes is None:
        return DEFAULT_MODES
    out: list[str] = []
    for mode in modes:
        if mode not in ENCODERS:
            raise ValueError(f"modes: unknown fusion mode {mode!r}; expected some of {', '.join(DEFAULT_MODES)}")
        if mode not in out:
            out.append(mode)
    if not out:
        raise ValueError("modes: give at least one fusion mode")
    return tuple(out)


def compare_ks(modes: Sequence[str]) -> list[int]:
    """The Compare sizes measured: the first k modes for k = 2 .. len(modes)."""
    return list(range(2, len(modes) + 1))


def second_mode_pairs(modes: Sequence[str]) -> list[tuple[str, str]]:
    """(A, B) pairs for the seen-image measurement: A is the first mode and B every later mode whose
    encoders A has already run (otherwise B would pay for an encoder and the image is not "seen")."""
    if len(modes) < 2:
        return []
    first = modes[0]
    return [(first, b) for b in modes[1:] if set(ENCODERS[b]) <= set(ENCODERS[first])]


def default_requests(profile_name: str) -> int:
    """Requests per mode and path when none are given. On `small` a cold Ask is 0.35-0.65 s on 2 free
    cores and the whole run with 20 takes about 5 minutes; when other jobs take the cores it runs
    3-5x slower, and the time budget (DEFAULT_BUDGET_S) then cuts the rounds to keep it near 10."""
    return DEFAULT_REQUESTS.get(profile_name, 5)


def default_rounds(requests: int, pairs: int) -> tuple[int, int]:
    """(Compare rounds, second-mode rounds) for ``requests`` per mode: about half as many, at least
    3; second-mode rounds are a multiple of the number of (A, B) pairs so each pair gets as many."""
    if requests < 1:
        raise ValueError(f"requests: must be positive, got {requests}")
    compare = max(3, math.ceil(requests / 2))
    if pairs < 1:
        return compare, 0
    second = max(3, math.ceil(requests / 2))
    return compare, pairs * math.ceil(second / pairs)


def images_needed(modes: Sequence[str], requests: int, compare_rounds: int, second_rounds: int) -> int:
    warm = len(modes)
    paths = requests * len(modes) * len(PATHS)
    compare = compare_rounds * (1 + len(compare_ks(modes)))
    second = second_rounds * 2
    return warm + paths + compare + second


# --------------------------------------------------------------------------------------------
# Analysis of the recorded samples


def latencies_ms(records: Iterable[Mapping], **match: Any) -> list[float]:
    return [r["ms"] for r in records if all(r.get(k) == v for k, v in match.items())]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def stage_breakdown(records: Sequence[Mapping], mode: str, path: str) -> dict[str, float]:
    """Median ms per stage, the stages' sum (encoders counted as they ran: side by side in Triton,
    so the slower one; one after the other in-process, so both), the median wall time and the rest
    (median of wall - stages per request: transport, scheduling, copies, the client)."""
    rows = [r for r in records if r.get("mode") == mode and r.get("path") == path and r.get("stages")]
    if not rows:
        return {}
    out = {stage: _median([r["stages"].get(stage, 0.0) for r in rows]) for stage in STAGES}

    def stages_sum(s: Mapping[str, float]) -> float:
        clip, dino = s.get("clip_ms", 0.0), s.get("dinov2_ms", 0.0)
        encoders = clip + dino if path == "inprocess" else max(clip, dino)
        return s.get("preprocess_ms", 0.0) + encoders + s.get("fusion_ms", 0.0) + s.get("llm_ms", 0.0)

    out["stages_ms"] = _median([stages_sum(r["stages"]) for r in rows])
    out["wall_ms"] = _median([r["ms"] for r in rows])
    out["other_ms"] = _median([r["ms"] - stages_sum(r["stages"]) for r in rows])
    return out


def analyse_paths(records: Sequence[Mapping], modes: Sequence[str]) -> dict[str, dict]:
    """Per mode: each path's latency summary, the front-end ratios and the front-end target."""
    out: dict[str, dict] = {}
    for mode in modes:
        summaries = {p: asdict(LatencySummary.of(v)) for p in PATHS if (v := latencies_ms(records, mode=mode, path=p))}
        fe, di, ip = (summaries.get(p) for p in PATHS)
        fe_over_direct = ratio(fe["p50"], di["p50"]) if fe and di else math.nan
        fe_rounds = {r["round"]: r["ms"] for r in records if r.get("mode") == mode and r.get("path") == "frontend"}
        di_rounds = {r["round"]: r["ms"] for r in records if r.get("mode") == mode and r.get("path") == "direct"}
        both = sorted(set(fe_rounds) & set(di_rounds))
        paired = paired_differences([fe_rounds[i] for i in both], [di_rounds[i] for i in both])
        out[mode] = {
            "summaries": summaries,
            "frontend_over_direct_p50": fe_over_direct,
            "frontend_over_direct_p99": ratio(fe["p99"], di["p99"]) if fe and di else math.nan,
            "frontend_over_inprocess_p50": ratio(fe["p50"], ip["p50"]) if fe and ip else math.nan,
            "frontend_over_inprocess_p99": ratio(fe["p99"], ip["p99"]) if fe and ip else math.nan,
            "paired_overhead_ms_median": _median(paired),
            "target": FRONTEND_TARGET,
            "met": meets(fe_over_direct, FRONTEND_TARGET),
            "stages": {p: stage_breakdown(records, mode, p) for p in PATHS},
        }
    return out


def analyse_compare(records: Sequence[Mapping], modes: Sequence[str]) -> dict:
    """Compare_k vs one cold Ask of the first mode: p50 ratio against 1 + 0.25 (k - 1)."""
    cold = latencies_ms(records, kind="ask")
    cold_p50 = percentile(cold, 50) if cold else math.nan
    rows = []
    for k in compare_ks(modes):
        times = latencies_ms(records, kind="compare", k=k)
        if not times:
            continue
        summary = LatencySummary.of(times)
        answers = [r["answers"] for r in records if r.get("kind") == "compare" and r.get("k") == k]
        first = [a[0]["stages"] for a in answers]
        rest = [s for a in answers for s in (x["stages"] for x in a[1:])]
        value = ratio(summary.p50, cold_p50)
        rows.append({
            "k": k, "modes": list(modes[:k]), "summary": asdict(summary), "cold_ask_p50": cold_p50,
            "ratio": value, "target": compare_target(k), "met": meets(value, compare_target(k)),
            "first_encoders_ms_median": _median([max(s["clip_ms"], s["dinov2_ms"]) for s in first]),
            "first_llm_ms_median": _median([s["llm_ms"] for s in first]),
            "later_encoders_ms_median": _median([max(s["clip_ms"], s["dinov2_ms"]) for s in rest]),
            "later_llm_ms_median": _median([s["llm_ms"] for s in rest]),
            "later_total_ms_median": _median([s["total_ms"] for s in rest]),
        })
    return {"cold_ask": asdict(LatencySummary.of(cold)) if cold else None, "mode": modes[0] if modes else None,
            "rows": rows}


def analyse_second_mode(records: Sequence[Mapping]) -> dict:
    """An Ask in mode B right after mode A on the same image vs a cold Ask of B (same rounds): per
    (A, B) pair the ratio of p50s; over all pairs the sum of the pairs' seen p50s over the sum of
    their cold p50s (so a pair whose cold Ask runs two encoders does not dominate)."""
    seen = [r for r in records if r.get("kind") == "seen_b"]
    cold = [r for r in records if r.get("kind") == "cold_b"]
    if not seen or not cold:
        return {"pairs": [], "ratio": math.nan, "target": SECOND_MODE_TARGET, "met": None}
    pairs = []
    for pair in sorted({r["pair"] for r in seen}):
        s = [r["ms"] for r in seen if r["pair"] == pair]
        c = [r["ms"] for r in cold if r["pair"] == pair]
        pairs.append({"pair": pair, "seen": asdict(LatencySummary.of(s)), "cold": asdict(LatencySummary.of(c)),
                      "ratio": ratio(percentile(s, 50), percentile(c, 50)),
                      "seen_encoders_ms_median": _median([r["stages"]["encoders_ms"] for r in seen
                                                          if r["pair"] == pair]),
                      "seen_llm_ms_median": _median([r["stages"]["llm_ms"] for r in seen if r["pair"] == pair]),
                      "cold_encoders_ms_median": _median([r["stages"]["encoders_ms"] for r in cold
                                                          if r["pair"] == pair]),
                      "cold_llm_ms_median": _median([r["stages"]["llm_ms"] for r in cold if r["pair"] == pair])})
    # each pair weighs the same, whatever its cold Ask costs (one encoder or two)
    value = ratio(sum(p["seen"]["p50"] for p in pairs), sum(p["cold"]["p50"] for p in pairs))
    cold_a = [r["ms"] for r in records if r.get("kind") == "cold_a"]
    return {"pairs": pairs, "seen": asdict(LatencySummary.of([r["ms"] for r in seen])),
            "cold": asdict(LatencySummary.of([r["ms"] for r in cold])), "ratio": value,
            "cold_a": asdict(LatencySummary.of(cold_a)) if cold_a else None,
            "ratio_vs_cold_a": ratio(percentile([r["ms"] for r in seen], 50), percentile(cold_a, 50))
            if cold_a else math.nan,
            "target": SECOND_MODE_TARGET, "met": meets(value, SECOND_MODE_TARGET)}


def pool_reports(reports: Sequence[Mapping]) -> dict:
    """One report from several runs' JSON reports (same profile and modes): their raw records
    together, analysed again. Rounds are renumbered per run so that paired differences only pair
    requests of the same round of the same run. Load and CPU use are kept per run."""
    if not reports:
        raise ValueError("pool: give at least one report")
    first = reports[0]
    for r in reports[1:]:
        if r["profile"] != first["profile"] or list(r["modes"]) != list(first["modes"]):
            raise ValueError(f"pool: reports differ in profile or modes ({r['profile']} {r['modes']} vs "
                             f"{first['profile']} {first['modes']})")
    modes = list(first["modes"])
    records: dict[str, list[dict]] = {"ask": [], "compare": [], "second_mode": []}
    for i, r in enumerate(reports):
        for phase, rows in records.items():
            rows.extend({**row, "round": i * 10_000 + row["round"], "run": i + 1} for row in r["records"][phase])
    agreement = {}
    for mode in modes:
        runs = [r["agreement"][mode] for r in reports if r.get("agreement", {}).get(mode)]
        if runs:
            agreement[mode] = {"agree": all(a["agree"] for a in runs), "chosen": [a["chosen"] for a in runs],
                               "answers": [a["answers"] for a in runs]}
    label = (lambda i, k: f"run {i + 1} {k}") if len(reports) > 1 else (lambda i, k: k)
    return {
        **{k: first[k] for k in ("benchmark", "machine", "versions", "profile", "random_weights", "serving", "modes",
                                 "question", "options", "max_new_tokens", "pause_s", "photos") if k in first},
        "runs": [{k: r.get(k) for k in ("date", "git_commit", "requests", "compare_rounds", "second_rounds",
                                        "load_average", "cpu", "seconds")} for r in reports],
        "requests": sum(r["requests"] for r in reports),
        "compare_rounds": sum(r["compare_rounds"] for r in reports),
        "second_rounds": sum(r["second_rounds"] for r in reports),
        "load_average": {label(i, k): v for i, r in enumerate(reports) for k, v in r["load_average"].items()},
        "cpu": {label(i, k): v for i, r in enumerate(reports) for k, v in r.get("cpu", {}).items()},
        "agreement": agreement,
        "paths": analyse_paths(records["ask"], modes),
        "compare": analyse_compare(records["compare"], modes),
        "second_mode": analyse_second_mode(records["second_mode"]),
        "records": records,
    }
