"""The Markdown of ``mofserve bench frontend``: the tables (latency per path, stages, Compare,
second mode), the MET / MISSED lines, the CPU line and the whole report that the command prints,
from an analysed report (``frontend_analysis``). Pure text, unit-tested on plain dicts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from mofserve.core.reports import number as _f  # the one cell format of every report
from mofserve.core.reports import times as _x

from .frontend_analysis import FRONTEND_TARGET, PATHS, SECOND_MODE_TARGET, verdict
from .pipelines import STAGES
from .workload import OPTIONS, QUESTION

PATH_LABELS = {"frontend": "front-end (gRPC Ask)", "direct": "direct ensemble", "inprocess": "in-process"}


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

