"""``mofserve bench frontend``: what the gRPC front-end costs, and what Compare and a second mode cost.

One process, one run, one profile (default ``small``). A ``MofServeApp`` (Triton + the gRPC and
HTTP front-ends) is started in-process on free loopback ports, on an asyncio loop in a background
thread, exactly as ``mofserve serve`` runs it. Then, with an MMVP-style question and options
("Is the dog facing left or right?" / "(a) Left (b) Right"), greedy decoding and a fixed
``max_new_tokens`` (8), it measures three ways of answering one question about one image:

1. ``frontend``: ``MofServeClient.ask`` over gRPC to the front-end (which calls the
   ``vqa_<mode>`` ensemble of Triton through ``TritonEngine``);
2. ``direct``: the same ``vqa_<mode>`` ensemble of the same Triton, called with
   ``tritonclient.grpc`` (the same tensors the engine sends);
3. ``inprocess``: the same pipeline with no server, as a researcher would run it in a notebook:
   ``preprocess_bytes`` -> ``OnnxRunner`` on the exported graphs that Triton serves, with the
   profile's serving runtime and precision -> ``Fuser`` -> the LM through ``LLMEngine`` (one
   sequence at a time; ``benchmarks/pipelines.py``).

Every request sends a DIFFERENT image (deterministic crops / flips / colour jitter of the
scikit-image sample photos, checked to be distinct after preprocessing): the encoders cache
features per image inside Triton, so a repeated image would skip them. Every request therefore
pays for the encoders (a cold Ask). The three paths are interleaved request by request, the order
rotating from round to round, with a short idle gap between requests, so that background load
lands on all three alike; per mode, p50 / p99 / mean latency are reported.

Then, through the front-end:

4. ``Compare`` over the first k modes (k = 2 .. len(modes); by default interleaved, additive,
   clip, dinov2) on a fresh image vs one cold Ask of the first mode on a fresh image, interleaved
   round by round: ratio p50(Compare_k) / p50(cold Ask) against the target 1 + 0.25 (k - 1);
5. a second mode on a seen image: an Ask in mode B right after an Ask in mode A on the same image
   (B's encoders are all among A's, so they are answered from the cache) vs a cold Ask of mode B on
   a fresh image: ratio p50(seen B) / p50(cold B), target <= 0.25.

The shared machine is watched: besides the load average (which counts this benchmark too) every
phase records the cores used by OTHER processes (``/proc/stat`` minus this process tree, Triton
included). A time budget (``budget_s``) bounds the timed phases: on a busy machine they stop early
with fewer rounds rather than run for an hour, and the report says so.

It prints Markdown tables with MET / MISSED per target and writes a JSON report (machine, load
average, CPU use, versions, git commit, raw latencies and per-stage timings); ``pool_reports``
re-analyses several reports together. The pure helpers (percentiles, ratio / target evaluation,
budget, CPU accounting, tables, image variants, pooling) are unit-tested without servers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mofserve.core import tensors as T
from mofserve.core.feature_cache import content_key
from mofserve.core.logs import configure_logging
from mofserve.core.machine import (
    TICKS_PER_S,
    cpu_snapshot,
    cpu_usage,
    git_commit,
    load_average,
    machine_info,
    versions,
)
from mofserve.core.preprocessing import preprocess_bytes
from mofserve.core.profiles import Profile, add_profile_arguments, get_profile, profile_from_args
from mofserve.core.reports import write_json
from mofserve.core.samples import SAMPLE_PHOTOS, sample_photos

from .pipelines import EagerBf16Pipeline, EagerPipeline, InProcessPipeline  # noqa: F401 (their home)
from .stats import percentile
from .workload import MAX_NEW_TOKENS, OPTIONS, QUESTION, VARIANT_SEED, distinct_variants

_logger = logging.getLogger(__name__)

DEFAULT_MODES = ("interleaved", "additive", "clip", "dinov2")
PATHS = ("frontend", "direct", "inprocess")
PATH_LABELS = {"frontend": "front-end (gRPC Ask)", "direct": "direct ensemble", "inprocess": "in-process"}
DEFAULT_REQUESTS = {"tiny": 20, "small": 20, "paper": 3}  # per mode and path; see default_requests
FRONTEND_TARGET = 1.10  # front-end p50 <= 1.10 x the direct ensemble call's p50 (on `small`)
SECOND_MODE_TARGET = 0.25  # a second mode on a seen image <= 0.25 x a cold Ask
PAUSE_S = 0.1  # idle gap between requests: spinning runtime threads of one call don't tax the next
# Time for the timed phases, shared out as a quiet run of `small` spends it (Ask 55%, Compare 28%,
# second mode 17%; unused time rolls over). A phase starts no new round once its share is spent
# (after MIN_ROUNDS), so a contended machine gives fewer samples instead of an hour-long run.
DEFAULT_BUDGET_S = 480.0
PHASE_SHARES = {"ask": 0.55, "compare": 0.28, "second_mode": 0.17}
MIN_ROUNDS = 3
STAGES = ("preprocess_ms", "clip_ms", "dinov2_ms", "fusion_ms", "llm_ms")
ENCODERS = {"clip": ("clip",), "dinov2": ("dinov2",), "additive": ("clip", "dinov2"),
            "interleaved": ("clip", "dinov2")}


# --------------------------------------------------------------------------------------------
# Pure helpers: statistics, targets


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


# --------------------------------------------------------------------------------------------
# Pure helpers: analysis of the recorded samples


def _ms(records: Iterable[Mapping], **match: Any) -> list[float]:
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
        summaries = {p: asdict(LatencySummary.of(v)) for p in PATHS if (v := _ms(records, mode=mode, path=p))}
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
    cold = _ms(records, kind="ask")
    cold_p50 = percentile(cold, 50) if cold else math.nan
    rows = []
    for k in compare_ks(modes):
        times = _ms(records, kind="compare", k=k)
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


# --------------------------------------------------------------------------------------------
# Pure helpers: tables


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}x"


def format_latency_table(paths: Mapping[str, Mapping]) -> str:
    """Per mode: p50 / p99 / mean of each path, the front-end ratios and the front-end verdict."""
    head = ["mode"]
    for p in PATHS:
        head += [f"{PATH_LABELS[p]} p50", "p99", "mean"]
    head += ["FE / direct (p50)", "FE / direct (p99)", "FE - direct, paired median ms", "FE / in-process (p50)",
             f"FE <= {FRONTEND_TARGET:.2f}x direct"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
    for mode, row in paths.items():
        cells = [mode]
        for p in PATHS:
            s = row["summaries"].get(p)
            cells += [_f(s["p50"]), _f(s["p99"]), _f(s["mean"])] if s else ["-", "-", "-"]
        cells += [_x(row["frontend_over_direct_p50"], 3), _x(row["frontend_over_direct_p99"]),
                  _f(row["paired_overhead_ms_median"]), _x(row["frontend_over_inprocess_p50"]), verdict(row["met"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_stage_table(paths: Mapping[str, Mapping]) -> str:
    """Median ms per stage and path: where the time goes."""
    head = ["mode", "path", "preprocess", "clip", "dinov2", "fusion", "llm", "stages", "wall", "other (wall - stages)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for mode, row in paths.items():
        for p in PATHS:
            s = row["stages"].get(p)
            if not s:
                continue
            lines.append("| " + " | ".join([mode, PATH_LABELS[p], *(_f(s[k]) for k in STAGES), _f(s["stages_ms"]),
                                            _f(s["wall_ms"]), _f(s["other_ms"])]) + " |")
    return "\n".join(lines)


def format_compare_table(compare: Mapping) -> str:
    head = ["k", "modes", "Compare p50", "Compare p99", f"cold Ask ({compare.get('mode')}) p50", "ratio", "target",
            "verdict", "1st mode: encoders / llm ms", "later modes: encoders / llm / total ms"]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|" + "---:|" * 5 + "---|---:|---:|"]
    for r in compare.get("rows", []):
        lines.append("| " + " | ".join([
            str(r["k"]), ", ".join(r["modes"]), _f(r["summary"]["p50"]), _f(r["summary"]["p99"]),
            _f(r["cold_ask_p50"]), _x(r["ratio"]), f"<= {r['target']:.2f}x", verdict(r["met"]),
            f"{_f(r['first_encoders_ms_median'])} / {_f(r['first_llm_ms_median'])}",
            f"{_f(r['later_encoders_ms_median'])} / {_f(r['later_llm_ms_median'])} / "
            f"{_f(r['later_total_ms_median'])}"]) + " |")
    return "\n".join(lines)


def format_second_mode_table(second: Mapping) -> str:
    head = ["A -> B", "seen B p50", "cold B p50", "ratio", "seen B: encoders / llm ms", "cold B: encoders / llm ms"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for p in second.get("pairs", []):
        lines.append("| " + " | ".join([
            p["pair"], _f(p["seen"]["p50"]), _f(p["cold"]["p50"]), _x(p["ratio"]),
            f"{_f(p['seen_encoders_ms_median'])} / {_f(p['seen_llm_ms_median'])}",
            f"{_f(p['cold_encoders_ms_median'])} / {_f(p['cold_llm_ms_median'])}"]) + " |")
    if second.get("pairs"):
        lines.append("| " + " | ".join([
            "**all pairs** (sums of the pairs' p50s)", _f(sum(p["seen"]["p50"] for p in second["pairs"])),
            _f(sum(p["cold"]["p50"] for p in second["pairs"])), _x(second["ratio"]),
            f"target <= {second['target']:.2f}x", f"**{verdict(second['met'])}**"]) + " |")
        if second.get("cold_a"):
            lines += ["", f"Against the cold Ask of A itself (p50 {_f(second['cold_a']['p50'])} ms, the same "
                          f"image's first request): {_x(second['ratio_vs_cold_a'])}."]
    return "\n".join(lines)


def format_verdicts(paths: Mapping[str, Mapping], compare: Mapping, second: Mapping, profile: str) -> str:
    """One line per target: value, limit, MET / MISSED."""
    lines = []
    fe = [(mode, row["frontend_over_direct_p50"], row["met"]) for mode, row in paths.items()]
    measured = [m for _, _, m in fe if m is not None]
    overall = None if not measured else all(measured)
    worst = max((v for _, v, _ in fe if not math.isnan(v)), default=math.nan)
    note = "" if profile == "small" else f" (the target is set for `small`; this is `{profile}`)"
    lines.append(f"- front-end <= {FRONTEND_TARGET:.2f}x the direct ensemble call (p50, every mode): "
                 f"worst {_x(worst, 3)} -> **{verdict(overall)}**{note}")
    for r in compare.get("rows", []):
        lines.append(f"- Compare over {r['k']} modes <= {r['target']:.2f}x a cold Ask (p50): {_x(r['ratio'])} -> "
                     f"**{verdict(r['met'])}**")
    if second.get("pairs"):
        lines.append(f"- second mode on a seen image <= {SECOND_MODE_TARGET:.2f}x a cold Ask (p50): "
                     f"{_x(second['ratio'])} -> **{verdict(second['met'])}**")
    return "\n".join(lines)


def format_cpu_line(cpu: Mapping[str, Mapping], cpus: int) -> str:
    """Cores used by other processes per phase (machine busy - this benchmark's process tree)."""
    phases = {k: v for k, v in cpu.items() if not math.isnan(v.get("others_cores", math.nan))}
    if not phases:
        return "CPU used by other processes: not measured."
    worst = max(v["others_cores"] for v in phases.values())
    text = "; ".join(f"{k} {v['others_cores']:.2f} (steal {v['steal_cores']:.2f})" for k, v in phases.items())
    note = " -> contended" if worst > 0.25 * cpus else " -> quiet"
    return f"Cores used by OTHER processes on average per phase (of {cpus}): {text}{note}."


def _cut(report: Mapping) -> str:
    planned = report.get("planned") or {}
    cut = [f"{report[k]} of {planned[k]} {k.replace('_', ' ')}" for k in ("requests", "compare_rounds",
                                                                         "second_rounds")
           if planned.get(k) is not None and report.get(k, 0) < planned[k]]
    return f" (the time budget cut the run: {', '.join(cut)})" if cut else ""


def format_report(report: Mapping) -> str:
    m = report["machine"]
    load = report["load_average"]
    runs = report.get("runs")
    pooled = f" (pooled from {len(runs)} runs)" if runs and len(runs) > 1 else ""
    lines = [
        f"## Front-end overhead and Compare (CPU): profile {report['profile']}, {m['cpu_model']}, "
        f"{m['usable_cpus']} CPUs{pooled}",
        "",
        f"Question {QUESTION!r}, options {OPTIONS!r}, greedy, max_new_tokens {report['max_new_tokens']}; "
        f"{report['requests']} timed requests per mode and path{_cut(report)} (after one warm-up each), a "
        "different image "
        "for every request so that every Ask pays for its encoders (cold); paths interleaved request by "
        f"request. p99 of {report['requests']} samples is close to their max. ms unless marked.",
        f"1-min load average (this benchmark included): "
        f"{' -> '.join(f'{p}: {v[0]:.1f}' for p, v in load.items())} on {m['usable_cpus']} CPUs.",
        format_cpu_line(report.get("cpu", {}), m["usable_cpus"] or 1),
        "",
        "### Ask latency per path",
        "",
        format_latency_table(report["paths"]),
        "",
        "### Where the time goes (median ms per stage; Triton's from the responses' timings)",
        "",
        format_stage_table(report["paths"]),
        "",
    ]
    if report["compare"].get("rows"):
        lines += [f"### Compare over k modes vs one cold Ask ({report['compare_rounds']} rounds, fresh images)", "",
                  format_compare_table(report["compare"]), ""]
    if report["second_mode"].get("pairs"):
        lines += [f"### A second mode on a seen image vs a cold Ask ({report['second_rounds']} rounds)", "",
                  format_second_mode_table(report["second_mode"]), ""]
    lines += [
        "### Targets",
        "",
        format_verdicts(report["paths"], report["compare"], report["second_mode"], report["profile"]),
    ]
    agreement = report.get("agreement")
    if agreement:
        lines += ["", "Warm-up check, one image through all three paths per mode: chosen option "
                  + ("and answer agree in every mode" if all(a["agree"] for a in agreement.values())
                     else "or answer DIFFER: " + ", ".join(f"{mode} {a['chosen']} {a['answers']}"
                                                           for mode, a in agreement.items() if not a["agree"]))
                  + (" of every run" if runs and len(runs) > 1 else "")]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The three paths


class LoopThread:
    """An asyncio loop in a daemon thread: the front-end runs there, as in ``mofserve serve``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-frontend-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _client_stages(timings) -> dict[str, float]:
    return {"preprocess_ms": timings.preprocess_ms, "clip_ms": timings.clip_ms, "dinov2_ms": timings.dinov2_ms,
            "fusion_ms": timings.fusion_ms, "llm_ms": timings.llm_ms, "encoders_ms": timings.encoders_ms,
            "total_ms": timings.total_ms}


class Bench:
    """The three paths on one started app; every call takes a fresh image and returns a record."""

    def __init__(self, profile, built, endpoints, images: Sequence[bytes]) -> None:
        import tritonclient.grpc as tritongrpc

        # lazy: grpc and the generated stubs, needed only by the gRPC client
        from mofserve.clients import MofServeClient

        self.profile = profile
        self.client = MofServeClient(endpoints.grpc, timeout=600)
        self.triton = tritongrpc.InferenceServerClient(endpoints.triton_grpc)
        self.tritongrpc = tritongrpc
        self.images = list(images)
        self.used = 0
        self.inprocess = InProcessPipeline(built)
        self._outputs: dict[str, list[str]] = {}

    def close(self) -> None:
        self.client.close()
        self.triton.close()
        self.inprocess.close()

    def fresh(self) -> tuple[int, bytes]:
        if self.used >= len(self.images):
            raise RuntimeError(f"bench frontend: ran out of the {len(self.images)} prepared images")
        self.used += 1
        return self.used - 1, self.images[self.used - 1]

    def frontend(self, image: bytes, mode: str) -> dict:
        started = time.perf_counter()
        r = self.client.ask(image, QUESTION, OPTIONS, mode=mode, max_new_tokens=MAX_NEW_TOKENS)
        ms = (time.perf_counter() - started) * 1e3
        return {"path": "frontend", "mode": mode, "ms": ms, "stages": _client_stages(r.timings),
                "answer": r.answer, "chosen": r.chosen_option}

    def compare(self, image: bytes, modes: Sequence[str]) -> dict:
        started = time.perf_counter()
        answers = self.client.compare(image, QUESTION, OPTIONS, modes=list(modes), max_new_tokens=MAX_NEW_TOKENS)
        ms = (time.perf_counter() - started) * 1e3
        return {"ms": ms, "answers": [{"mode": a.mode, "stages": _client_stages(a.timings), "answer": a.answer,
                                       "chosen": a.chosen_option} for a in answers]}

    def _vqa_outputs(self, model: str) -> list[str]:
        if model not in self._outputs:
            available = {o.name for o in self.triton.get_model_metadata(model).outputs}
            wanted = [T.ANSWER, T.CHOSEN_OPTION, T.OPTION_SCORES, T.TIMING_PREPROCESS, T.TIMING_CLIP,
                      T.TIMING_DINOV2, T.TIMING_FUSION, T.TIMING_LLM]
            self._outputs[model] = [n for n in wanted if n in available]
        return self._outputs[model]

    def direct(self, image: bytes, mode: str) -> dict:
        """The ``vqa_<mode>`` ensemble with the tensors ``TritonEngine.ask`` sends (no ALPHA: the
        profile's default, as the front-end without one)."""
        g = self.tritongrpc
        model = T.vqa_model(mode)
        names = self._vqa_outputs(model)
        started = time.perf_counter()
        inputs = []
        for name, value in ((T.IMAGE, image), (T.QUESTION, QUESTION.encode()), (T.OPTIONS, OPTIONS.encode())):
            tensor = g.InferInput(name, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[value]], dtype=object))
            inputs.append(tensor)
        tokens = g.InferInput(T.MAX_NEW_TOKENS, [1, 1], "INT32")
        tokens.set_data_from_numpy(np.array([[MAX_NEW_TOKENS]], dtype=np.int32))
        inputs.append(tokens)
        result = self.triton.infer(model, inputs, outputs=[g.InferRequestedOutput(n) for n in names])
        ms = (time.perf_counter() - started) * 1e3

        def scalar(name: str) -> float:
            array = result.as_numpy(name)
            return 0.0 if array is None else float(np.asarray(array).reshape(-1)[0])

        stages = {"preprocess_ms": scalar(T.TIMING_PREPROCESS), "clip_ms": scalar(T.TIMING_CLIP),
                  "dinov2_ms": scalar(T.TIMING_DINOV2), "fusion_ms": scalar(T.TIMING_FUSION),
                  "llm_ms": scalar(T.TIMING_LLM)}
        stages["encoders_ms"] = max(stages["clip_ms"], stages["dinov2_ms"])

        def text(name: str) -> str:
            value = np.asarray(result.as_numpy(name)).reshape(-1)[0]
            return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)

        return {"path": "direct", "mode": mode, "ms": ms, "stages": stages, "answer": text(T.ANSWER),
                "chosen": text(T.CHOSEN_OPTION)}

    def in_process(self, image: bytes, mode: str) -> dict:
        started = time.perf_counter()
        answer, stages = self.inprocess.answer(image, mode)
        ms = (time.perf_counter() - started) * 1e3
        return {"path": "inprocess", "mode": mode, "ms": ms, "stages": stages, "answer": answer.text,
                "chosen": answer.chosen_option}

    def call(self, path: str, image: bytes, mode: str) -> dict:
        return {"frontend": self.frontend, "direct": self.direct, "inprocess": self.in_process}[path](image, mode)


# --------------------------------------------------------------------------------------------
# Phases


def warm_up(bench: Bench, modes: Sequence[str]) -> dict[str, dict]:
    """One untimed request per mode and path, all three on the same image (the direct and
    in-process answers can then be checked against the front-end's)."""
    agreement = {}
    for mode in modes:
        _, image = bench.fresh()
        got = {p: bench.call(p, image, mode) for p in PATHS}
        time.sleep(PAUSE_S)
        chosen = {p: r["chosen"] for p, r in got.items()}
        answers = {p: r["answer"] for p, r in got.items()}
        agreement[mode] = {"chosen": chosen, "answers": answers,
                           "agree": len(set(chosen.values())) == 1 and len(set(answers.values())) == 1}
        _logger.info(f"warm-up {mode}: " + ", ".join(f"{p} {r['ms']:.0f} ms ({r['chosen']})" for p, r in got.items()))
    return agreement


def run_paths(bench: Bench, modes: Sequence[str], requests: int, deadline: float | None = None) -> list[dict]:
    """``requests`` rounds (fewer if ``deadline`` passes); in each, every mode once on every path,
    each on a fresh image, the order of paths (and of modes) rotating from round to round."""
    records = []
    for r in range(requests):
        if out_of_time(deadline, r):
            _logger.info(f"Ask phase: time budget spent after {r} of {requests} rounds")
            break
        started = time.perf_counter()
        for j, mode in enumerate(rotated(modes, r)):
            for path in rotated(PATHS, r + j):
                index, image = bench.fresh()
                rec = bench.call(path, image, mode)
                records.append({"phase": "ask", "round": r, "image": index, **rec})
                time.sleep(PAUSE_S)
        medians = ", ".join(f"{p} {statistics.median(_ms(records, path=p, round=r)):.0f}" for p in PATHS)
        _logger.info(f"round {r + 1}/{requests} in {time.perf_counter() - started:.1f} s: {medians} ms "
                     "(median over modes)")
    return records


def run_compare(bench: Bench, modes: Sequence[str], rounds: int, deadline: float | None = None) -> list[dict]:
    """Each round: one cold Ask of the first mode and one Compare per k, each on a fresh image."""
    items: list[tuple[str, int]] = [("ask", 1), *(("compare", k) for k in compare_ks(modes))]
    records = []
    for r in range(rounds):
        if out_of_time(deadline, r):
            _logger.info(f"Compare phase: time budget spent after {r} of {rounds} rounds")
            break
        for kind, k in rotated(items, r):
            index, image = bench.fresh()
            if kind == "ask":
                rec = bench.frontend(image, modes[0])
                records.append({"phase": "compare", "kind": "ask", "k": 1, "round": r, "image": index, **rec})
            else:
                rec = bench.compare(image, modes[:k])
                records.append({"phase": "compare", "kind": "compare", "k": k, "round": r, "image": index, **rec})
            time.sleep(PAUSE_S)
        _logger.info(f"compare round {r + 1}/{rounds}: " + ", ".join(
                     f"{'ask' if x['kind'] == 'ask' else 'k=' + str(x['k'])} {x['ms']:.0f}" for x in records
                     if x["round"] == r) + " ms")
    return records


def run_second_mode(bench: Bench, pairs: Sequence[tuple[str, str]], rounds: int,
                    deadline: float | None = None) -> list[dict]:
    """Each round, for one (A, B) pair (cycling): Ask A on a fresh image X then, at once, Ask B on X
    (seen); and a cold Ask of B on another fresh image; which of the two goes first alternates."""
    records = []
    for r in range(rounds):
        if out_of_time(deadline, r, max(MIN_ROUNDS, len(pairs))):
            _logger.info(f"second-mode phase: time budget spent after {r} of {rounds} rounds")
            break
        a, b = pairs[r % len(pairs)]
        label = f"{a} -> {b}"
        for step in rotated(["pair", "cold"], r // len(pairs)):
            if step == "pair":
                index, image = bench.fresh()
                first = bench.frontend(image, a)
                second = bench.frontend(image, b)
                records.append({"phase": "second", "kind": "cold_a", "pair": label, "round": r, "image": index,
                                **first})
                records.append({"phase": "second", "kind": "seen_b", "pair": label, "round": r, "image": index,
                                **second})
            else:
                index, image = bench.fresh()
                rec = bench.frontend(image, b)
                records.append({"phase": "second", "kind": "cold_b", "pair": label, "round": r, "image": index,
                                **rec})
            time.sleep(PAUSE_S)
        _logger.info(f"second-mode round {r + 1}/{rounds} ({label}): " + ", ".join(
                     f"{x['kind']} {x['ms']:.0f}" for x in records if x["round"] == r) + " ms")
    return records


def out_of_time(deadline: float | None, rounds_done: int, min_rounds: int = MIN_ROUNDS) -> bool:
    """Whether a phase should start no further round: its deadline (time.monotonic) has passed and
    it has at least ``min_rounds``."""
    return deadline is not None and rounds_done >= min_rounds and time.monotonic() > deadline


def phase_deadline(phase: str, now: float, end: float | None) -> float | None:
    """The deadline of ``phase`` starting ``now``: its share of what is left until ``end`` among the
    phases still to run (so the time an earlier phase did not use rolls over)."""
    if end is None:
        return None
    names = list(PHASE_SHARES)
    left = sum(PHASE_SHARES[n] for n in names[names.index(phase):])
    return now + max(end - now, 0.0) * PHASE_SHARES[phase] / left


def images_needed(modes: Sequence[str], requests: int, compare_rounds: int, second_rounds: int) -> int:
    warm = len(modes)
    paths = requests * len(modes) * len(PATHS)
    compare = compare_rounds * (1 + len(compare_ks(modes)))
    second = second_rounds * 2
    return warm + paths + compare + second


# --------------------------------------------------------------------------------------------
# Entry point


def pool_main(reports: Sequence[Path | str], output: Path | str | None = None) -> int:
    """Pool earlier JSON reports (``--pool``), print the tables and write the pooled report."""
    pooled = pool_reports([json.loads(Path(p).read_text()) for p in reports])
    print(format_report(pooled))
    if output is not None:
        _write(pooled, Path(output))
    return 0


def _write(report: Mapping, path: Path) -> None:
    write_json(path, report)
    _logger.info(f"report -> {path}")


def main(profile=None, requests: int | None = None, modes: Sequence[str] | None = None,
         output: Path | str | None = None, compare_rounds: int | None = None,
         second_rounds: int | None = None, budget_s: float | None = DEFAULT_BUDGET_S) -> int:
    """Run the benchmark on ``profile`` (a Profile or a name; default ``small``), print the tables
    and write the JSON report to ``output`` if given. ``budget_s`` bounds the timed phases (None or
    0: no bound): each phase stops starting rounds when its share is spent (see PHASE_SHARES)."""
    from mofserve.export.pipeline import export_profile  # lazy: export imports torch (and tritonclient's protobufs)
    from mofserve.server.app import MofServeApp  # lazy: the server pulls grpc, aiohttp and tritonclient
    from mofserve.server.config import ServeConfig  # lazy: the server pulls grpc, aiohttp and tritonclient

    if profile is None or isinstance(profile, str):
        profile = get_profile(profile or "small")
    assert isinstance(profile, Profile)
    modes = parse_modes(modes)
    requests = default_requests(profile.name) if requests is None else int(requests)
    pairs = second_mode_pairs(modes)
    default_compare, default_second = default_rounds(requests, len(pairs))
    compare_rounds = default_compare if compare_rounds is None else compare_rounds
    second_rounds = default_second if second_rounds is None else second_rounds
    if len(modes) < 2:
        compare_rounds = 0
    if not pairs:
        second_rounds = 0
    started = time.perf_counter()
    load: dict[str, list[float]] = {"start": load_average()}
    machine = machine_info()
    _logger.info(f"{machine['cpu_model']} ({machine['usable_cpus']} usable CPUs); load average {load['start']}")
    _logger.info(f"profile {profile.name}: modes {', '.join(modes)}; {requests} requests per mode and path, "
                 f"{compare_rounds} Compare rounds, {second_rounds} second-mode rounds")

    built = export_profile(profile, target="cpu", log=lambda m: _logger.info(f"export {m}"))
    count = images_needed(modes, requests, compare_rounds, second_rounds)
    t = time.perf_counter()
    photos = sample_photos()

    def pixels_key(data: bytes) -> bytes:
        return content_key(preprocess_bytes(data, profile.image_size, aspect=profile.aspect))

    images = distinct_variants(photos, count, key=pixels_key)
    _logger.info(f"{count} distinct images (by preprocessed pixels) in {time.perf_counter() - t:.1f} s")

    config = ServeConfig(profile=profile.name, grpc_port=0, http_port=0, clip=profile.sources.clip,
                         dinov2=profile.sources.dinov2, llava=profile.sources.llava)
    loop = LoopThread()
    app = MofServeApp(config, log=lambda m: _logger.info(f"serve {m}"))
    bench: Bench | None = None
    try:
        t = time.perf_counter()
        endpoints = loop.run(app.start(), timeout=1800)
        startup_s = time.perf_counter() - t
        _logger.info(f"serving in {startup_s:.1f} s: gRPC {endpoints.grpc}, Triton {endpoints.triton_grpc}")
        t = time.perf_counter()
        bench = Bench(profile, built, endpoints, images)
        inprocess_load_s = time.perf_counter() - t
        triton_version = bench.triton.get_server_metadata().version
        _logger.info(f"in-process pipeline loaded in {inprocess_load_s:.1f} s ({bench.inprocess.runtime} "
                     f"{bench.inprocess.precision}); Triton {triton_version}")
        load["serving"] = load_average()

        cpu: dict[str, dict[str, float]] = {}

        def phase(name: str, work: Callable[[], Any]) -> Any:
            before, t0 = cpu_snapshot(), time.perf_counter()
            result = work()
            after = cpu_snapshot()
            load[f"after_{name}"] = load_average()
            if before is not None and after is not None:
                cpu[name] = cpu_usage(before, after, TICKS_PER_S)
            _logger.info(f"{name} phase in {time.perf_counter() - t0:.0f} s; cores used: {cpu.get(name)}")
            return result

        agreement = phase("warmup", lambda: warm_up(bench, modes))
        end = time.monotonic() + budget_s if budget_s else None
        ask_records = phase("ask", lambda: run_paths(bench, modes, requests,
                                                     phase_deadline("ask", time.monotonic(), end)))
        compare_records = phase("compare", lambda: run_compare(
            bench, modes, compare_rounds, phase_deadline("compare", time.monotonic(), end))) if compare_rounds else []
        second_records = phase("second_mode", lambda: run_second_mode(
            bench, pairs, second_rounds, phase_deadline("second_mode", time.monotonic(), end))) if second_rounds else []
    finally:
        if bench is not None:
            bench.close()
        try:
            loop.run(app.stop(), timeout=120)
        finally:
            loop.close()
    load["end"] = load_average()
    elapsed = time.perf_counter() - started

    report = {
        "benchmark": "frontend",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine,
        "versions": {**versions(), "tritonserver": triton_version},
        "profile": profile.name,
        "random_weights": profile.random_weights,
        "serving": asdict(profile.serving),
        "modes": list(modes),
        "question": QUESTION,
        "options": OPTIONS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "requests": len({r["round"] for r in ask_records}),
        "compare_rounds": len({r["round"] for r in compare_records}),
        "second_rounds": len({r["round"] for r in second_records}),
        "planned": {"requests": requests, "compare_rounds": compare_rounds, "second_rounds": second_rounds},
        "budget_s": budget_s,
        "pause_s": PAUSE_S,
        "photos": list(SAMPLE_PHOTOS),
        "images": {"count": len(images), "used": bench.used if bench else 0, "format": "JPEG q90",
                   "seed": VARIANT_SEED, "distinct_by": "blake2b of the preprocessed pixels (feature-cache key)"},
        "startup_s": round(startup_s, 1),
        "inprocess_load_s": round(inprocess_load_s, 1),
        "load_average": load,
        "cpu": cpu,
        "agreement": agreement,
        "paths": analyse_paths(ask_records, modes),
        "compare": analyse_compare(compare_records, modes),
        "second_mode": analyse_second_mode(second_records),
        "records": {"ask": ask_records, "compare": compare_records, "second_mode": second_records},
        "seconds": round(elapsed, 1),
    }
    print()
    print(format_report(report))
    _logger.info(f"done in {elapsed:.0f} s")
    if output is not None:
        _write(report, Path(output))
    return 0


def arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mofserve bench frontend`` (profile ``small`` by default, as the encoder benchmark)."""
    add_profile_arguments(parser)
    parser.set_defaults(profile="small")
    parser.add_argument("--requests", type=int, help="timed requests per mode and path (default 20)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for the timed phases; on a busy machine they stop early (0: no limit)")
    parser.add_argument("--modes", nargs="+", choices=DEFAULT_MODES,
                        help="fusion modes, the first is Compare's first and the seen-image Ask's A "
                             f"(default: {' '.join(DEFAULT_MODES)})")
    parser.add_argument("--output", type=Path, help="write the JSON report here")
    parser.add_argument("--pool", type=Path, nargs="+", metavar="REPORT",
                        help="run nothing: pool these JSON reports (same profile and modes) and print the tables")


def run(args: argparse.Namespace) -> int:
    """``mofserve bench frontend``: the benchmark, or with ``--pool`` only the pooling of earlier reports."""
    if args.pool:
        return pool_main(args.pool, output=args.output)
    return main(profile_from_args(args), requests=args.requests, modes=args.modes, output=args.output,
                budget_s=args.budget_s)


if __name__ == "__main__":  # the command's own two functions: no import of the CLI above this floor
    _parser = argparse.ArgumentParser(prog="python -m mofserve.benchmarks.frontend")
    arguments(_parser)
    _args = _parser.parse_args()
    configure_logging()
    raise SystemExit(run(_args))
