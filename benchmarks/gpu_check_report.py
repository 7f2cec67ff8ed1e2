"""The GPU check's report (``benchmarks/gpu_check.py``): stage parts merged into one report, the
summary scored against the best measured bf16 rate, ``gpu_check.json`` / ``gpu_check.md`` and the
short table printed last. The llm stage's line and section are formatted here too, from its part
alone: the report reads the stages' data and imports no stage module."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mofserve.benchmarks.gpu_check_common import ENCODERS, TARGET_SHARE, _ms, _params, _pct
from mofserve.benchmarks.llm_joining import format_joining
from mofserve.core.reports import write_json, write_text


def merge_part(report: dict, stage: str, data: Mapping) -> None:
    for key, value in data.items():
        if key == "compiled":
            compiled = report.setdefault("compiled", {})
            compiled.update({k: v for k, v in value.items() if k in ENCODERS})
            ceilings = report.setdefault("ceilings", [])
            ceilings += [value[k] for k in ("ceiling_gflops_per_s", "ceiling_after_gflops_per_s") if k in value]
            compiled["compile_mode"] = value.get("compile_mode")
        else:
            report[key] = value
            if key == "eager":
                report.setdefault("ceilings", []).extend(
                    value[k] for k in ("ceiling_gflops_per_s", "ceiling_after_gflops_per_s") if k in value)
            if key == "matmul":
                report.setdefault("ceilings", []).append(value["gflops_per_s"])


def _best(rows: Mapping) -> dict | None:
    scored = [r for r in rows.get("batches", {}).values() if "best_images_per_s" in r]
    return max(scored, key=lambda r: r["best_images_per_s"]) if scored else None


def summarise(report: dict) -> dict:
    """Per encoder: the best batch eager and compiled, the share of the best measured bf16 rate
    (rescored against the best ceiling of the whole run), the gate; and whether the target is met."""
    ceilings = [c for c in report.get("ceilings", []) if c]
    ceiling = max(ceilings) if ceilings else None
    out: dict = {"ceiling_gflops_per_s": ceiling, "encoders": {}}
    for name in ENCODERS:
        entry: dict = {}
        for kind in ("eager", "compiled"):
            rows = report.get(kind, {}).get(name)
            best = _best(rows) if rows else None
            if best:
                share = rows["flops_per_image"] * best["best_images_per_s"] / 1e9 / ceiling if ceiling else None
                entry[kind] = {"batch": best["batch"], "images_per_s": best["best_images_per_s"], "share": share}
        gate = report.get("accuracy", {}).get(name, {})
        entry["min_cosine"] = gate.get("min_cosine")
        shares = [v["share"] for k, v in entry.items() if k in ("eager", "compiled") and v.get("share") is not None]
        entry["target_met"] = (max(shares) >= TARGET_SHARE) if shares else None
        out["encoders"][name] = entry
    return out


def _f(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: Mapping) -> str:
    """The short table printed last."""
    summary = report.get("summary") or summarise(dict(report))
    env = report.get("environment", {})
    lines = [f"card: {env.get('card', '?')}; torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}; "
             f"bf16 matmul ceiling {_f((summary['ceiling_gflops_per_s'] or 0) / 1e3, '.2f')} TFLOP/s",
             "| encoder | eager bf16 img/s (batch) | share | compiled bf16 img/s (batch) | share | gate min cos | "
             f">= {TARGET_SHARE:.0%} |", "|---|---|---|---|---|---|---|"]
    for name, e in summary["encoders"].items():
        cells = []
        for kind in ("eager", "compiled"):
            v = e.get(kind)
            cells += [f"{v['images_per_s']:.1f} ({v['batch']})" if v else "-",
                      f"{v['share']:.1%}" if v and v.get("share") is not None else "-"]
        met = {True: "yes", False: "no", None: "-"}[e["target_met"]]
        lines.append(f"| {name} | {' | '.join(cells)} | {_f(e['min_cosine'], '.6f')} | {met} |")
    statuses = ", ".join(f"{k} {v['status']}" for k, v in report.get("stages", {}).items())
    lines.append(f"stages: {statuses}")
    serving = report.get("serving", {})
    if serving.get("points"):
        best = max(serving["points"], key=lambda p: p["requests_per_s"])
        lines.append(f"serving: best {best['requests_per_s']:.1f} req/s ({best['model']}, c={best['concurrency']}, "
                     f"p50 {best['latency_ms']['p50']:.1f} ms)")
    llm = llm_summary_line(report.get("llm", {}))
    if llm:
        lines.append(llm)
    return "\n".join(lines)


def llm_summary_line(llm: dict) -> str | None:
    """The short table's line: batch-1 decode and its HBM share, the batched ratios, the prefills."""
    if not llm.get("model"):
        return None
    m = llm["model"]
    parts = [f"llm ({m['layers']} layers, {_params(m['params'])}, {m['dtype']})"]
    serial = llm.get("decode", {}).get("one_at_a_time")
    if serial and "error" not in serial:
        step, graph = llm.get("steps", {}).get("1", {}), llm.get("graphs", {}).get("1", {})
        parts.append(f"1 seq {serial['tokens_per_s']:.1f} tok/s ({_ms(serial['full_batch_step_ms'])} ms/step, "
                     f"{_pct(serial.get('hbm_share'))} of HBM; bare step {_ms(step.get('step_ms'))} ms, "
                     f"{_pct(step.get('hbm_share'))}; CUDA graph {_ms(graph.get('step_ms'))} ms)")
    for n, run in llm.get("decode", {}).get("batched", {}).items():
        parts.append(f"{n} seqs: {run['error'][:80]}" if "error" in run else
                     f"{n} seqs {run['tokens_per_s']:.1f} tok/s ({run['ratio']:.1f}x one at a time)")
    chunked = llm.get("joining", {}).get("runs", {}).get("256")
    if chunked:
        parts.append(f"I-MoF joins, chunks of 256: running ITL p99 {chunked['itl_p99_vs_whole']:.2f}x, "
                     f"joiner TTFT {chunked['ttft_p50_vs_whole']:.2f}x the whole prompt's")
    prefill = ", ".join(f"{k}: {v['median_ms']:.0f} ms" for k, v in llm.get("prefill", {}).items())
    if prefill:
        parts.append(f"prefill {prefill}")
    return "; ".join(parts)


def llm_markdown(llm: dict) -> list[str]:
    """The LLM section of ``gpu_check.md`` (none when the llm stage built no model)."""
    if not llm.get("model"):
        return []
    m = llm["model"]
    lines = [f"## LLM: in-flight batching engine ({m['layers']} layers x {m['hidden']}, {_params(m['params'])} "
             f"parameters, {m['dtype']}, random weights)", "",
             f"{m['card']}; weights {m['weight_bytes'] / 1e9:.2f} GB ({m['decode_weight_bytes'] / 1e9:.2f} GB read "
             f"per decode step), K/V {m['kv_bytes_per_token'] / 2**20:.2f} MiB per position, attention "
             f"{m['attention']}, built in {m['build_s']} s; HBM peak "
             f"{_f_tb(m['hbm_peak_bytes_per_s'])}."]
    if llm.get("cut_short"):
        lines += ["", f"Cut short: {llm['cut_short']}."]
    if llm.get("prefill"):
        lines += ["", "| prefill positions | visual tokens | ms (median of 3) | TFLOP/s |", "|---|---|---|---|"]
        lines += [f"| {p['prompt_tokens']} | {p['visual_tokens']} | {p['median_ms']:.1f} | {p['tflops_per_s']:.1f} |"
                  for p in llm["prefill"].values()]
    decode = llm.get("decode", {})
    serial = decode.get("one_at_a_time")
    if serial and "error" in serial:
        lines += ["", f"Decode one at a time failed: {serial['error']}"]
    elif serial:
        lines += ["", f"Decode: {decode['new_tokens']} new tokens per sequence (greedy, no EOS), prompts of "
                  f"{decode['prompt_tokens']} positions. One at a time: {serial['sequences']} sequences through "
                  "`max_sequences=1`, its rate taken for any count (more sequences one at a time take "
                  f"proportionally longer); its batch-1 step reaches {_pct(serial.get('hbm_share'))} of HBM "
                  "bandwidth.", "",
                  "| concurrent | batched tok/s | one at a time tok/s | ratio | ms/step at full batch | "
                  "tok/s at full batch | ratio at full batch | greedy tokens as one at a time |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| 1 | {serial['tokens_per_s']:.1f} | {serial['tokens_per_s']:.1f} | 1.00 | "
                  f"{_ms(serial['full_batch_step_ms'])} | {_f(serial['full_batch_tokens_per_s'])} | 1.00 | - |"]
        for n, run in decode.get("batched", {}).items():
            if "error" in run:
                lines.append(f"| {n} | {run['error'][:100]} | | | | | | |")
                continue
            agree = run["agreement_with_one_at_a_time"]
            lines.append(f"| {n} | {run['tokens_per_s']:.1f} | {serial['tokens_per_s']:.1f} | {run['ratio']:.2f} | "
                         f"{_ms(run['full_batch_step_ms'])} | {_f(run['full_batch_tokens_per_s'])} | "
                         f"{_f(run.get('full_batch_ratio'), '.2f')} | {agree['identical']}/{agree['sequences']} "
                         f"(common start {agree['mean_common_prefix']:.1f}) |")
    if llm.get("joining"):
        lines += ["", "A request joins running streams: the prefill whole vs in chunks fused with the decode "
                  "steps (`benchmarks/llm_joining.py`):", "", format_joining(llm["joining"])]
    if llm.get("steps"):
        graphs = llm.get("graphs", {})
        lines += ["", "Bare `decode_step` (model only, no engine) at the prompt's context:", "",
                  "| batch | ms/step | host enqueue ms | GB read | HBM share | CUDA graph ms/step | graph HBM share |",
                  "|---|---|---|---|---|---|---|"]
        for key, s in llm["steps"].items():
            g = graphs.get(key, {})
            if "error" in s:
                lines.append(f"| {key} | {s['error'][:100]} | | | | | |")
                continue
            graph = g.get("error", "")[:60] or _ms(g.get("step_ms"))
            lines.append(f"| {key} | {s['step_ms']:.2f} | {s['enqueue_ms']:.2f} | {s['bytes_read'] / 1e9:.2f} | "
                         f"{_pct(s['hbm_share'])} | {graph} | {_pct(g.get('hbm_share'))} |")
    return [*lines, ""]


def _f_tb(value) -> str:
    return "unknown for this card" if value is None else f"{value / 1e12:.2f} TB/s"


def format_markdown(report: Mapping) -> str:
    lines = ["# GPU check (gpu-torch)", "", f"Started {report.get('started')}, {report.get('seconds', '?')} s.", "",
             format_table(report), ""]
    for kind in ("eager", "compiled"):
        section = report.get(kind, {})
        if not any(name in section for name in ENCODERS):
            continue
        lines += [f"## {kind} bf16 (per batch)", "", "| encoder | batch | img/s (median) | img/s (best) | ms/batch "
                  "(median) | first call s | GFLOP/s | share |", "|---|---|---|---|---|---|---|---|"]
        for name in ENCODERS:
            for row in sorted(section.get(name, {}).get("batches", {}).values(), key=lambda r: r["batch"]):
                if "error" in row:
                    lines.append(f"| {name} | {row['batch']} | {row['error']} | | | | | |")
                    continue
                lines.append(f"| {name} | {row['batch']} | {row['images_per_s']:.1f} | {row['best_images_per_s']:.1f}"
                             f" | {row['median_ms']:.2f} | {row['first_call_s']:.1f} | {row['gflops_per_s']:.0f} | "
                             f"{_f(row.get('share_of_ceiling'), '.1%')} |")
        lines.append("")
    lines += llm_markdown(report.get("llm", {}))
    serving = report.get("serving", {})
    if serving.get("points"):
        lines += ["## Serving (Triton, tokens_<mode>, closed loop)", "",
                  f"Checkpoints {serving.get('checkpoints_s')} s, server start {serving.get('start_s')} s.", "",
                  "| model | concurrency | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
        for p in serving["points"]:
            lat = p["latency_ms"]
            lines.append(f"| {p['model']} | {p['concurrency']} | {p['requests_per_s']:.1f} | {_f(lat['p50'])} | "
                         f"{_f(lat['p99'])} | {p['errors']} |")
        lines.append("")
    lines += ["## Stages", "", "| stage | status | s | note |", "|---|---|---|---|"]
    checkpoints = report.get("checkpoints")
    if checkpoints:
        status = "ok" if checkpoints.get("rc") == 0 else f"rc {checkpoints.get('rc')}"
        lines.append(f"| checkpoints (background) | {status} | {checkpoints.get('seconds', '')} | "
                     "seeded checkpoints of the serving stage |")
    for stage, entry in report.get("stages", {}).items():
        note = entry.get("reason") or (entry.get("log_tail", "").splitlines() or [""])[-1]
        lines.append(f"| {stage} | {entry['status']} | {entry.get('seconds', '')} | {note[:160]} |")
    return "\n".join(lines) + "\n"


def write_report(report: Mapping, out: Path) -> None:
    write_json(out / "gpu_check.json", report)
    write_text(out / "gpu_check.md", format_markdown(report))

