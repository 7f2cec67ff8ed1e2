"""Markdown tables of ``mofserve bench load``'s report about tokens and targets: per point the time
to first token, inter-token latency, output and decode tokens/s; where a request's time goes
(encoders / prefill / decode); the LM's extrapolation to a deeper model (``--extrapolate-layers``);
the same-run baselines and the targets with MET / MISSED (``benchmarks/baselines.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from mofserve.core.reports import number as _f  # the one cell format of every report
from mofserve.core.reports import times as _x


def _label(point: Mapping) -> str:
    return f"c={point['value']:g}" if point["kind"] == "concurrency" else f"{point['value']:g}/s"


def format_token_table(points: Sequence[Mapping]) -> str | None:
    """Per point: output tokens and tokens/s; for streamed answers TTFT and ITL p50/p99 and the LLM's
    decode tokens/s with the mean number of streams decoding at once. None when no point counted tokens."""
    rows = []
    for p in points:
        t = p.get("tokens") or {}
        if not t.get("requests_counted") and not t.get("streamed"):
            continue
        ttft, itl = t.get("ttft_ms") or {}, t.get("itl_ms") or {}
        rows.append(f"| {_label(p)} | {t.get('output_tokens', 0)} | {_f(t.get('output_tokens_per_s'), 2)} | "
                    f"{_f(ttft.get('p50'))} | {_f(ttft.get('p99'))} | {_f(itl.get('p50'))} | {_f(itl.get('p99'))} | "
                    f"{_f(t.get('decode_tokens_per_s'), 2)} | {_f(t.get('decode_tokens_per_s_with_prefills'), 2)} | "
                    f"{_f(t.get('decode_concurrency'), 2)} | "
                    f"{t.get('streamed', 0)} ({t.get('ttft_from_first_message', 0)}) |")
    if not rows:
        return None
    return "\n".join(["| point | output tokens | output tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
                      "ITL p99 ms | decode tokens/s | decode tokens/s with prefills | streams decoding at once "
                      "(mean) | streamed (first message = first token) |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows])


def split_means(point: Mapping) -> dict[str, float] | None:
    """Mean ms per successful request: client latency, encoders, preprocess + fusion, LLM queue,
    prefill, decode and the rest (client - those); None when the server does not split the LLM."""
    rows = [r for r in point.get("records", ()) if r.get("ok") and r.get("timings")
            and "prefill_ms" in r["timings"]]
    if not rows:
        return None

    def mean(key):
        return float(np.mean([r["timings"].get(key, 0.0) for r in rows]))

    out = {"n": len(rows), "client_ms": float(np.mean([r["ms"] for r in rows])), "encoders_ms": mean("encoders_ms"),
           "pre_fusion_ms": mean("preprocess_ms") + mean("fusion_ms"), "llm_queue_ms": mean("llm_queue_ms"),
           "prefill_ms": mean("prefill_ms"), "decode_ms": mean("decode_ms")}
    ttft = [r["ttft_ms"] for r in rows if r.get("ttft_ms") is not None]
    out["ttft_ms"] = float(np.mean(ttft)) if ttft else math.nan
    out["rest_ms"] = out["client_ms"] - sum(out[k] for k in ("encoders_ms", "pre_fusion_ms", "llm_queue_ms",
                                                              "prefill_ms", "decode_ms"))
    return out


def format_split_table(points: Sequence[Mapping]) -> str | None:
    rows = []
    for p in points:
        s = split_means(p)
        if s:
            rows.append(f"| {_label(p)} | {s['n']} | {_f(s['client_ms'])} | {_f(s['encoders_ms'])} | "
                        f"{_f(s['pre_fusion_ms'])} | {_f(s['llm_queue_ms'])} | {_f(s['prefill_ms'])} | "
                        f"{_f(s['decode_ms'])} | {_f(s['rest_ms'])} | {_f(s['ttft_ms'])} |")
    if not rows:
        return None
    return "\n".join(["| point | n | client | encoders | preprocess + fusion | LLM queue | prefill | decode | "
                      "rest (Triton, front-end, transport) | TTFT |", "|---|---:|" + "---:|" * 8, *rows])


def _decode_factor(factors: Mapping, point: Mapping) -> tuple[str, float]:
    """The decode step's scale factor of the batch nearest the point's streams decoding at once."""
    steps = factors["decode_step"]
    width = ((point.get("tokens") or {}).get("decode_concurrency") or 1.0)
    batch = min(steps, key=lambda b: abs(int(b) - width))
    return batch, steps[batch]


def format_extrapolation(report: Mapping) -> str | None:
    """The measured split scaled to the deeper LM with the in-process per-layer fits: an EXTRAPOLATION."""
    layers = report.get("llm_layers")
    if not layers:
        return None
    factors, n = layers["factors"], layers["layers"]
    lines = [f"**Extrapolation, not a measurement.** In process, on the served LM ({layers['own_layers']} layers, "
             f"{layers['prompt_tokens']}-position prompt of `{layers['mode']}`), prefill and one decode step were "
             f"timed with the LM cut or cycled to {', '.join(map(str, layers['depths']))} layers; a line fixed + "
             f"layers x per-layer cost gives the {n}-layer LM at {_x(factors['prefill'])} the prefill and "
             + ", ".join(f"{_x(f)} a decode step at batch {b}" for b, f in factors["decode_step"].items())
             + ". Applied to each point's measured means (encoders, the rest and the queue unchanged; the decode "
             "factor of the batch nearest the point's streams decoding at once):", "",
             f"| point | prefill ms (measured -> {n} layers) | decode ms | TTFT ms | request ms | decode tokens/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for p in report["points"]:
        s = split_means(p)
        if not s:
            continue
        batch, fd = _decode_factor(factors, p)
        fp = factors["prefill"]
        prefill, decode = s["prefill_ms"] * fp, s["decode_ms"] * fd
        ttft = s["ttft_ms"] + s["prefill_ms"] * (fp - 1) if math.isfinite(s["ttft_ms"]) else math.nan
        request = s["client_ms"] + prefill - s["prefill_ms"] + decode - s["decode_ms"]
        tps = (p.get("tokens") or {}).get("decode_tokens_per_s")
        lines.append(f"| {_label(p)} (batch {batch}) | {_f(s['prefill_ms'])} -> {_f(prefill)} | "
                     f"{_f(s['decode_ms'])} -> {_f(decode)} | {_f(s['ttft_ms'])} -> {_f(ttft)} | "
                     f"{_f(s['client_ms'])} -> {_f(request)} | {_f(tps, 2)} -> {_f(tps / fd if tps else None, 2)} |")
    fits = [("prefill", layers["prefill"])] + [(f"decode step, batch {b}", f) for b, f in layers["decode_step"].items()]
    lines += ["", "| in-process fit | " + " | ".join(f"{d} layers ms" for d in layers["depths"])
              + f" | fixed ms | per layer ms | {n} layers ms (extrapolated) |",
              "|---|" + "---:|" * (len(layers["depths"]) + 3)]
    for name, fit in fits:
        lines.append(f"| {name} | " + " | ".join(_f(fit["measured_ms"][str(d)]) for d in layers["depths"])
                     + f" | {_f(fit['fixed_ms'])}{' (through 0)' if fit.get('through_origin') else ''} | "
                     f"{_f(fit['per_layer_ms'])} | {_f(fit['extrapolated_ms'])} |")
    return "\n".join(lines)


def token_sections(report: Mapping) -> list[str]:
    lines: list[str] = []
    tokens = format_token_table(report["points"])
    if tokens:
        lines += ["", "Tokens per point: TTFT = time to the first token from the request's start (the first "
                  "streamed message when it carries exactly one token; else, where the server held whitespace or "
                  "part of a character back, the client's latency less the server's time after its first token); "
                  "ITL = time between streamed messages per token (a message carrying k tokens counts k gaps); "
                  "decode tokens/s = tokens after each request's first over the time any request was decoding, "
                  "less the prefills the LLM ran meanwhile (each request's prefill_ms, ending at its first token); "
                  "with prefills: over the whole time any request was decoding:", "", tokens]
    split = format_split_table(report["points"])
    if split:
        lines += ["", "Where a request's time goes (mean ms; the server's timings, LLM = queue + prefill + decode; "
                  "prefill includes option scoring and the first token):", "", split]
    extrapolation = format_extrapolation(report)
    if extrapolation:
        lines += ["", f"### The LM at {report['llm_layers']['layers']} layers (extrapolated)", "", extrapolation]
    return lines


def format_baseline_table(baselines: Mapping) -> str:
    """The in-process baselines (same images and questions as the sweep, one request at a time) and
    the same-run ratios with their verdicts."""
    lines = ["| baseline | runtime, precision | requests | req/s | p50 ms | p90 ms | p99 ms | mean ms | TTFT p50 ms | "
             "encoders ms | LLM ms | prefill ms | decode ms | output tokens/s | load s | other processes' cores |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, b in baselines["runs"].items():
        lat, st = b["latency_ms"], b.get("stages_ms") or {}
        lines.append(f"| {name} ({b['label']}) | {b['runtime']}, {b['precision']} | {b['requests']} | "
                     f"{_f(b['throughput_rps'], 2)} | {_f(lat['p50'])} | {_f(lat['p90'])} | {_f(lat['p99'])} | "
                     f"{_f(lat['mean'])} | {_f((b.get('ttft_ms') or {}).get('p50'))} | {_f(st.get('encoders_ms'))} | "
                     f"{_f(st.get('llm_ms'))} | {_f(st.get('prefill_ms'))} | {_f(st.get('decode_ms'))} | "
                     f"{_f(b.get('output_tokens_per_s'), 2)} | {_f(b['load_s'])} | "
                     f"{_f((b.get('cpu') or {}).get('others_cores'), 2)} |")
    r = baselines["ratios"]
    t, p = r["throughput"], r["p50_c1"]
    lines += ["", "| ratio (same run) | value | target | verdict |", "|---|---:|---:|---|",
              f"| serving throughput at the best concurrency (c={_f(t['best_concurrency'], 0)}: "
              f"{_f(t['serving_rps'], 2)} req/s) / eager ({_f(t['eager_rps'], 2)} req/s) | {_x(t['value'])} | "
              f">= {t['target']:g}x | {t['verdict'] or 'n/a'} |",
              f"| p50 at c=1, fresh images ({_f(p['serving_p50_ms'])} ms, n={p['fresh_requests']}) / exported "
              f"in-process p50 ({_f(p['exported_p50_ms'])} ms) | {_x(p['value'])} | <= {p['target']:g}x | "
              f"{p['verdict'] or 'n/a'} |"]
    ttft = r.get("ttft_c1")
    if ttft and ttft.get("streamed_requests"):
        lines.append(f"| TTFT p50 at c=1, fresh images ({_f(ttft['serving_ttft_p50_ms'])} ms, "
                     f"n={ttft['streamed_requests']}) / exported in-process path to the first token "
                     f"({_f(ttft['exported_ttft_p50_ms'])} ms) | {_x(ttft['value'])} | <= {ttft['target']:g}x | "
                     f"{ttft['verdict'] or 'n/a'} |")
    lines += [f"| serving throughput (best) / exported in-process throughput | {_x(r['throughput_vs_exported'])} | | |",
              f"| serving throughput (best) / eager bf16 in-process throughput | "
              f"{_x(r.get('throughput_vs_eager_bf16'))} | | |",
              f"| p50 at c=1, all requests / exported in-process p50 | {_x(r['p50_c1_all_vs_exported'])} | | |"]
    return "\n".join(lines)


def format_targets(rows: Sequence[Mapping], profile: str | None) -> str:
    lines = ["| target | value | target | set for | verdict |", "|---|---:|---:|---|---|"]
    for row in rows:
        note = "" if row["this_profile"] else f" (this run: `{profile}`)"
        lines.append(f"| {row['what']} | {_x(row['value'])} | {'>=' if row['at_least'] else '<='} {row['target']:g}x | "
                     f"`{row['set_for']}`{note} | **{row['verdict']}** |")
    return "\n".join(lines)
