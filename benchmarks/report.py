"""The report of ``mofserve bench load``: one JSON (machine, versions, server profile, git commit,
every point with its raw records), a Markdown table and PNG plots (matplotlib, Agg backend):

* ``latency_<kind>.png``: p50/p90/p95/p99/max latency vs concurrency (or offered rate);
* ``throughput_<kind>.png``: achieved throughput vs concurrency (or offered rate);
* ``latency_cdf.png``: the latency CDF of every point;
* ``stages.png``: per point and fusion mode, the client latency split into the server's mean
  per-stage times (stacked bars), Triton's scheduling / queueing / transfers (the front-end's
  ``total_ms`` minus the stages) and the front-end + transport (client latency minus ``total_ms``).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mofserve.core.machine import git_commit, load_average, machine_info, versions
from mofserve.core.reports import number as _f  # the one cell format of every report
from mofserve.core.reports import write_json, write_text

from .baselines import baseline_ratios, point_targets, target_rows
from .load_tables import format_baseline_table, format_targets, token_sections
from .stats import PERCENTILES, stage_means

STACK = (("preprocess_ms", "preprocess"), ("encoders_ms", "encoders (max of CLIP, DINOv2)"),
         ("fusion_ms", "fusion"), ("llm_ms", "LLM"))


def build_report(config, server: Mapping, points: Sequence[Mapping], began: float | None = None,
                 images: int | None = None, baselines: Mapping[str, Mapping] | None = None,
                 layers: Mapping | None = None) -> dict:
    report = {
        "benchmark": "load",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "began": _dt.datetime.fromtimestamp(began, _dt.UTC).isoformat(timespec="seconds") if began else None,
        "target": config.target.url,
        "transport": config.target.scheme,
        "config": config.to_dict(),
        "server": dict(server),
        "machine": machine_info(),
        "load_average_end": load_average(),
        "versions": versions(("mofserve", "grpcio", "protobuf", "numpy", "pillow", "aiohttp", "matplotlib")),
        "git_commit": git_commit(),
        # what changes the served stack's behaviour from outside (the server inherits it with --serve)
        "environment": {k: v for k, v in sorted(os.environ.items())
                        if k.startswith(("MOFSERVE_", "OMP_", "GOMP_")) and "TOKEN" not in k},
        "images_made": images,
        "modes_stages_ms": stages_by_mode(points),
        "repeat_stages_ms": stages_by_repeat(points),
        "points": list(points),
    }

    ratios = None
    if baselines:
        ratios = baseline_ratios(baselines, points)
        report["baselines"] = {"runs": dict(baselines), "ratios": ratios}
    report["point_targets"] = point_targets(points)
    report["targets"] = target_rows(ratios, report["point_targets"], server.get("profile"))
    if layers:
        report["llm_layers"] = dict(layers)
    return report


def _stage_rows(rows: Sequence[Mapping]) -> dict[str, float]:
    means = stage_means(r["timings"] for r in rows)
    means["client_ms"] = float(np.mean([r["ms"] for r in rows]))
    stages = sum(means.get(k, 0.0) for k, _ in STACK)
    means["overhead_ms"] = means["client_ms"] - stages
    means["triton_other_ms"] = means["total_ms"] - stages
    means["frontend_ms"] = means["client_ms"] - means["total_ms"]
    means["n"] = len(rows)
    return means


def stages_by(points: Sequence[Mapping], key) -> dict[str, dict[str, float]]:
    """Mean server stage times per ``key(record)`` over the successful requests of every point, with
    ``client_ms`` (the client-side latency), ``overhead_ms`` (client latency minus the stages),
    split into ``triton_other_ms`` (the front-end's ``total_ms`` around the Triton call minus the
    stages: Triton's scheduling, queueing and tensor transfers) and ``frontend_ms`` (client latency
    minus ``total_ms``: the front-end itself and the transport)."""
    groups: dict[str, list[dict]] = {}
    for point in points:
        for r in point.get("records", ()):
            if r["ok"] and r.get("timings"):
                groups.setdefault(key(r), []).append(r)
    return {name: _stage_rows(rows) for name, rows in sorted(groups.items())}


def stages_by_mode(points: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    return stages_by(points, lambda r: r["mode"])


def stages_by_repeat(points: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """The same split into fresh images and images already sent (encoder features cached)."""
    return stages_by(points, lambda r: "repeated" if r["repeated"] else "fresh")


# --------------------------------------------------------------------------------------------
# Markdown


def _label(point: Mapping) -> str:
    return f"c={point['value']:g}" if point["kind"] == "concurrency" else f"{point['value']:g}/s"


def format_points_table(points: Sequence[Mapping]) -> str:
    head = ("| point | requests | ok | errors | req/s | " + " | ".join(f"p{q} ms" for q in PERCENTILES)
            + " | max ms | repeated | encoders ms | LLM ms | other processes' cores |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in points:
        lat, stages = p["latency_ms"], p.get("stages_ms") or {}
        errors = str(p["errors"]) + (" (" + ", ".join(f"{k}: {v}" for k, v in p["errors_by_code"].items()) + ")"
                                     if p["errors"] else "")
        lines.append(f"| {_label(p)} | {p['requests']} | {p['ok']} | {errors} | {_f(p['throughput_rps'], 2)} | "
                     + " | ".join(_f(lat[f"p{q}"]) for q in PERCENTILES)
                     + f" | {_f(lat['max'])} | {_f(100 * p['repeated_share'], 0)}% | "
                     f"{_f(stages.get('encoders_ms'))} | {_f(stages.get('llm_ms'))} | "
                     f"{_f((p.get('cpu') or {}).get('others_cores'), 2)} |")
    return "\n".join(lines)


def format_stage_table(groups: Mapping[str, Mapping[str, float]], first: str = "mode") -> str:
    lines = [f"| {first} | n | preprocess | clip | dinov2 | fusion | LLM | Triton other | front-end total | "
             "client | front-end + transport |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in groups.items():
        lines.append(f"| {name} | {s['n']} | {_f(s['preprocess_ms'])} | {_f(s['clip_ms'])} | {_f(s['dinov2_ms'])} | "
                     f"{_f(s['fusion_ms'])} | {_f(s['llm_ms'])} | {_f(s['triton_other_ms'])} | {_f(s['total_ms'])} | "
                     f"{_f(s['client_ms'])} | {_f(s['frontend_ms'])} |")
    return "\n".join(lines)


def format_triton_table(points: Sequence[Mapping]) -> str | None:
    """Per point and Triton model: requests, executions (batches), mean request / queue / compute ms,
    and the encoders' feature-cache hits and misses; None when no point has Triton's metrics."""
    rows = []
    for p in points:
        triton = p.get("triton") or {}
        cache = triton.get("feature_cache", {})
        for model, m in triton.get("models", {}).items():
            hits = cache.get(model)
            ratio = f"{hits.get('hit', 0)} / {hits.get('miss', 0)}" if hits else ""
            rows.append(f"| {_label(p)} | {model} | {m['requests']} | {m['executions']} | {_f(m['request_ms'])} | "
                        f"{_f(m['queue_ms'])} | {_f(m['compute_ms'])} | {ratio} |")
    if not rows:
        return None
    return "\n".join(["| point | Triton model | requests | executions | request ms | queue ms | compute ms | "
                      "cache hit / miss |", "|---|---|---:|---:|---:|---:|---:|---|", *rows])


def _cache_hits(point: Mapping) -> str:
    cache = (point.get("triton") or {}).get("feature_cache", {})
    if not cache:
        return ""
    hit = sum(v.get("hit", 0) for v in cache.values())
    miss = sum(v.get("miss", 0) for v in cache.values())
    return f"{hit} / {miss}"


def format_perf_analyzer_table(section: Mapping) -> str:
    """perf_analyzer's points: per model and concurrency, its throughput, latency percentiles and
    its split of the average latency (server queue, server compute, network + server I/O)."""
    lines = ["| model | point | infer/s | " + " | ".join(f"p{q} ms" for q in PERCENTILES) + " | mean ms | "
             "server queue ms | server compute ms | network + server I/O ms | encoder cache hit / miss | "
             "error / note |",
             "|---|---|---:|" + "---:|" * len(PERCENTILES) + "---:|---:|---:|---:|---|---|"]
    for p in section.get("points", ()):
        if p.get("error"):
            lines.append(f"| {p['model']} | {_label(p)} |" + " - |" * (len(PERCENTILES) + 5)
                         + f" {_cache_hits(p)} | {p['error'].replace('|', '/')} |")
            continue
        lat, st = p["latency_ms"], p.get("stages_ms") or {}
        compute = sum(st.get(k) or 0.0 for k in ("server_compute_input", "server_compute_infer",
                                                 "server_compute_output"))
        lines.append(f"| {p['model']} | {_label(p)} | {_f(p['throughput_rps'], 2)} | "
                     + " | ".join(_f(lat.get(f"p{q}")) for q in PERCENTILES)
                     + f" | {_f(lat.get('mean'))} | {_f(st.get('server_queue'))} | {_f(compute)} | "
                     f"{_f(st.get('network_server_send_recv'))} | {_cache_hits(p)} | "
                     f"{'UNSTABLE: ' + p['unstable'] if p.get('unstable') else ''} |")
    return "\n".join(lines)


def _perf_analyzer_intro(section: Mapping) -> str:
    if section.get("error"):
        return f"perf_analyzer did not run: {section['error']}"
    c, tool, images = section["config"], section.get("tool", {}), section.get("images", {})
    return (f"NVIDIA perf_analyzer ({tool.get('version', '?')}, from the tritonclient {tool.get('tritonclient', '?')} "
            f"wheel) straight to Triton's gRPC {c['triton_grpc']}, no front-end: count windows of "
            f"{c['request_count']} requests, stability {c['stability_percent']}%, at most {c['max_trials']} trials; "
            f"input data: {images.get('per_point')} real-image JPEGs per point"
            + (", never sent before" if images.get("fresh_per_point") else "")
            + ", cycled (once a point has sent them all, the encoders answer from their feature cache: hits / "
            "misses per point below).")


def format_markdown(report: Mapping) -> str:
    if report.get("benchmark") == "perf_analyzer":
        section, machine = report["perf_analyzer"], report["machine"]
        return "\n".join([
            f"# mofserve bench perf-analyzer: {report['target']} ({report['created']})", "",
            f"Server profile `{report['server'].get('profile')}`; machine {machine['cpu_model']}, "
            f"{machine['usable_cpus']} usable CPUs; git {report['git_commit']}; load average at the end "
            f"{report['load_average_end']}.", "", _perf_analyzer_intro(section), "",
            format_perf_analyzer_table(section)])
    return _format_load_markdown(report)


def _format_load_markdown(report: Mapping) -> str:
    server, machine, config = report["server"], report["machine"], report["config"]
    mix = ", ".join(f"{m} {w:.0%}" for m, w in config["mix"].items())
    bound = (f"{config['duration_s']:g} s" if config["duration_s"] is not None else "") + (
        f"{' / ' if config['duration_s'] is not None else ''}{config['requests']} requests"
        if config["requests"] else "")
    lines = [
        f"# mofserve bench load: {report['target']} ({report['created']})",
        "",
        f"Server profile `{server.get('profile')}`" + (" (random weights)" if server.get("random_weights") else "")
        + f"; machine {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs; git {report['git_commit']}; "
        f"load average at the end {report['load_average_end']}.",
        f"Mix {mix}; repeat ratio {config['repeat_ratio']:g}; {bound} per point after {config['warmup_s']:g} s "
        f"warm-up; max_new_tokens {config['max_new_tokens']}; latencies in ms of successful requests.",
        "",
        format_points_table(report["points"]),
        "",
        "Server stages, mean ms over all points. *Triton other* = the front-end's time around the Triton "
        "call (*front-end total*) minus the stages (Triton scheduling, queueing, transfers); *front-end + "
        "transport* = client latency minus *front-end total*. Per mode:",
        "",
        format_stage_table(report["modes_stages_ms"]),
        "",
        "Fresh images vs images already sent (the encoders answer a repeated image from their feature cache):",
        "",
        format_stage_table(report.get("repeat_stages_ms", {}), first="image"),
    ]
    triton = format_triton_table(report["points"])
    if triton:
        lines += ["", "Triton's own metrics over each timed phase (mean ms per request of that model; an "
                  "ensemble's request time includes its steps):", "", triton]
    lines += token_sections(report)
    if report.get("baselines"):
        lines += ["", "## Baselines in the same run", "",
                  "Before the sweep, in the benchmark's own process, the same question on the sweep's first "
                  "images (its first fresh requests) with modes drawn from the same mix, one request at a time, "
                  "after one untimed request per mode:", "", format_baseline_table(report["baselines"])]
    if report.get("targets"):
        lines += ["", "## Targets (same run)", "", format_targets(report["targets"], server.get("profile"))]
    if report.get("perf_analyzer"):
        lines += ["", "## perf_analyzer on the Triton ensembles", "", _perf_analyzer_intro(report["perf_analyzer"]),
                  "", format_perf_analyzer_table(report["perf_analyzer"])]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots


def _plots(report: Mapping, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    points = report["points"]

    def save(fig, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    pa_points = [p for p in (report.get("perf_analyzer") or {}).get("points", ()) if not p.get("error")]
    if pa_points:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        series: dict[str, list[Mapping]] = {}
        for p in pa_points:
            series.setdefault(f"perf_analyzer {p['model']}", []).append(p)
        closed = [p for p in points if p["kind"] == "concurrency" and p["ok"] > 0]
        if closed:
            series[f"front-end ({report.get('transport')}, mode mix)"] = closed
        for name, pts in series.items():
            pts = sorted(pts, key=lambda p: p["value"])
            xs = [p["value"] for p in pts]
            left.plot(xs, [p["throughput_rps"] for p in pts], marker="o", label=name)
            line, = right.plot(xs, [p["latency_ms"]["p50"] for p in pts], marker="o", label=f"{name} p50")
            right.plot(xs, [p["latency_ms"]["p99"] for p in pts], marker="x", linestyle="--", color=line.get_color(),
                       label=f"{name} p99")
        left.set_xlabel("concurrency")
        left.set_ylabel("throughput, req/s")
        left.set_ylim(bottom=0)
        left.set_title("Throughput: perf_analyzer (Triton direct) vs front-end")
        right.set_xlabel("concurrency")
        right.set_ylabel("latency, ms")
        right.set_title("p50 (solid) and p99 (dashed)")
        for ax in (left, right):
            ax.set_xticks(sorted({p["value"] for pts in series.values() for p in pts}))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "perf_analyzer.png")
    if not points:
        return written

    for kind, xlabel in (("concurrency", "concurrency (closed loop)"), ("rate", "offered rate, req/s (open loop)")):
        pts = [p for p in points if p["kind"] == kind]
        if not pts:
            continue
        xs = [p["value"] for p in pts]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for key in [f"p{q}" for q in PERCENTILES] + ["max"]:
            ax.plot(xs, [p["latency_ms"][key] for p in pts], marker="o", label=key)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("latency, ms")
        ax.set_title(f"Latency vs {kind} ({report['server'].get('profile')}, {report['transport']})")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, f"latency_{kind}.png")

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ax.plot(xs, [p["throughput_rps"] for p in pts], marker="o", label="achieved")
        if kind == "rate":
            ax.plot(xs, xs, linestyle="--", color="grey", label="offered")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("throughput, successful req/s")
        ax.set_title(f"Throughput vs {kind}")
        ax.set_xticks(xs)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, f"throughput_{kind}.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for p in points:
        ms = np.sort([r["ms"] for r in p.get("records", ()) if r["ok"]])
        if len(ms):
            ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post", label=_label(p))
    ax.set_xlabel("latency, ms")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF per point")
    ax.grid(alpha=0.3)
    if points:
        ax.legend()
    save(fig, "latency_cdf.png")

    # one stacked bar per (point, mode); gaps between points
    bars: list[tuple[str, dict]] = []
    for p in points:
        for mode, means in stages_by_mode([p]).items():
            bars.append((f"{mode}\n{_label(p)}", means))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.75 * len(bars) + 2), 4.6))
    names = [name for name, _ in bars]
    xs = np.arange(len(bars))
    bottom = np.zeros(len(bars))
    for key, label in (*STACK, ("triton_other_ms", "Triton scheduling, queueing, transfers"),
                       ("frontend_ms", "front-end + transport")):
        values = np.array([max(means.get(key, 0.0), 0.0) for _, means in bars])
        ax.bar(xs, values, bottom=bottom, label=label)
        bottom += values
    ax.set_xticks(xs, names, fontsize=7)
    ax.set_ylabel("mean ms per request (client latency)")
    ax.set_title("Where the time goes, per fusion mode and point")
    if names:
        ax.set_ylim(top=float(bottom.max()) * 1.6)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.grid(alpha=0.3, axis="y")
    save(fig, "stages.png")
    return written


def write_report(report: Mapping, out: Path | str, plots: bool = True) -> list[Path]:
    """report.json (NaN written as null), report.md and, unless ``plots`` is false, the PNGs."""
    out = Path(out)
    written = [out / "report.json", out / "report.md"]
    write_json(written[0], report, indent=1)
    write_text(written[1], format_markdown(report) + "\n")
    if plots:
        written += _plots(report, out)
    return written
