"""The run and the report of the in-process LLM-stage benchmark (``benchmarks/llm_stage.py``):
``python -m mofserve.benchmarks.llm_stage [--profile paper-shaped] [--sections ...] [--out DIR]``
(``make bench-llm``). Writes ``report.json`` (machine, versions, git commit, load averages, every
stream's times and tokens) and ``report.md`` (the tables printed at the end) into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
from collections.abc import Mapping
from pathlib import Path

from mofserve.core.machine import cpu_snapshot, cpu_usage_since, git_commit, load_average, machine_info, versions
from mofserve.core.profiles import PROFILE_NAMES, get_profile
from mofserve.core.reports import number as _f  # the one cell format of every report
from mofserve.core.reports import write_json, write_text

from . import llm_joining as J
from . import llm_stage as S

WAYS = (("engine_batched", "LLMEngine, all submitted at once"),
        ("engine_one_at_a_time", "LLMEngine, max_sequences 1 (one at a time)"),
        ("hf_generate", "transformers generate, one at a time (inputs_embeds)"),
        ("hf_continuous_batching", "transformers continuous batching (generate_batch's manager; token ids)"))


def format_engines(engines: Mapping) -> str:
    lines = ["| way | TTFT p50 ms | TTFT max ms | output tokens/s | decode tokens/s (prefills out) | decode "
             "tokens/s with prefills | decode steps' tokens/s | sequences decoding at once (mean) | wall s | tokens | "
             "other processes' cores |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in WAYS:
        r = engines.get(key)
        if not r:
            continue
        if r.get("error"):
            lines.append(f"| {label} | error: {r['error'].replace('|', '/')} |" + " - |" * 9)
            continue
        lines.append(f"| {label} | {_f(r['ttft_ms']['p50'])} | {_f(r['ttft_ms']['max'])} | "
                     f"{_f(r['output_tokens_per_s'], 2)} | {_f(r['decode_tokens_per_s'], 2)} | "
                     f"{_f(r['decode_tokens_per_s_with_prefills'], 2)} | {_f(r.get('step_tokens_per_s'), 2)} | "
                     f"{_f(r['decode_concurrency'], 2)} | {_f(r['wall_s'])} | {r['output_tokens']} | "
                     f"{_f((r.get('cpu') or {}).get('others_cores'), 2)} |")
    steps = (engines.get("engine_batched") or {}).get("steps") or {}
    if steps:
        lines += ["", "LLMEngine's decode steps in the batched run (tokens/s = batch / step time):", "",
                  "| batch | steps | median step ms | tokens/s |", "|---:|---:|---:|---:|"]
        lines += [f"| {b} | {s['steps']} | {_f(s['median_ms'])} | {_f(s['tokens_per_s'], 2)} |"
                  for b, s in steps.items()]
    return "\n".join(lines)


def format_layers(costs: Mapping) -> str:
    n = costs["layers"]
    depths = costs["depths"]
    others = (costs.get("cpu") or {}).get("others_cores")
    lines = [f"Prompt of {costs['prompt_tokens']} positions; the LM has {costs['own_layers']} layers, timed cut or "
             f"cycled to {', '.join(map(str, depths))} in {costs.get('rounds', '?')} rotating rounds, best of each "
             f"(other processes used {_f(others, 2)} cores meanwhile). **{n}-layer figures are an EXTRAPOLATION** "
             "(fixed + layers x per-layer cost, least squares), not a measurement.", "",
             "| phase | " + " | ".join(f"{d} layers ms" for d in depths) + " | fixed ms | per layer ms | fit worst "
             f"error | {n} layers ms (extrapolated) |", "|---|" + "---:|" * (len(depths) + 4)]
    rows = [("prefill", costs["prefill"])] + [(f"decode step, batch {b}", fit)
                                              for b, fit in costs["decode_step"].items()]
    for name, fit in rows:
        lines.append(f"| {name} | " + " | ".join(_f(fit["measured_ms"][str(d)]) for d in depths)
                     + f" | {_f(fit['fixed_ms'])}{' (through 0)' if fit.get('through_origin') else ''} | "
                     f"{_f(fit['per_layer_ms'])} | "
                     f"{100 * fit['fit_worst_error']:.1f}% | {_f(fit['extrapolated_ms'])} |")
    steps = costs["decode_step"]
    if len(steps) > 1:
        small, large = min(steps, key=int), max(steps, key=int)
        one = 1e3 * int(small) / steps[small]["extrapolated_ms"]
        many = 1e3 * int(large) / steps[large]["extrapolated_ms"]
        prefill_s = costs["prefill"]["extrapolated_ms"] / 1e3
        lines += ["", f"Extrapolated to {n} layers: decode {_f(one, 2)} tokens/s at batch {small}, {_f(many, 2)} at "
                      f"batch {large} ({_f(many / one, 2)}x); prefill {_f(prefill_s, 2)} s."]
    return "\n".join(lines)


def format_agreement(runs: Mapping) -> str:
    lines = ["| LM | dtype | requests (visual tokens) | batched == one at a time | tokens before the first "
             "difference | first difference (token index per request; - = identical) | chosen options agree | "
             "generate == one at a time |", "|---|---|---|---:|---:|---|---:|---:|"]
    for name, r in runs.items():
        if r.get("error"):
            lines.append(f"| {name} | error: {r['error'].replace('|', '/')} |" + " - |" * 6)
            continue
        b, g = r["batched_vs_one_at_a_time"], r["generate_vs_one_at_a_time"]
        visual = sorted({q["visual_tokens"] for q in r["requests"]})
        firsts = ", ".join("-" if f is None else str(f) for f in b["first_difference"])
        lines.append(f"| {name} (hidden {r['hidden_size']}) | {r['dtype']} | {b['requests']} "
                     f"({'/'.join(map(str, visual))}) | {b['identical']}/{b['requests']} | "
                     f"{100 * b['tokens_before_first_difference_share']:.0f}% | "
                     f"{firsts} | {r['chosen_agree']}/{b['requests']} | {g['identical']}/{g['requests']} |")
    return "\n".join(lines)


def format_report(report: Mapping) -> str:
    m, c = report["machine"], report["config"]
    lines = [f"# LLM stage in process: {report['profile']} ({report['created']})", "",
             f"{report['description']}; machine {m['cpu_model']}, {m['usable_cpus']} usable CPUs; torch threads "
             f"{report['torch_threads']}; git {report['git_commit']}; load average {report['load_average']}.",
             f"{c['sequences']} sequences of {c['prompt_tokens']} prompt positions, {c['new_tokens']} new tokens, "
             "greedy. TTFT from each request's submission (submitted together, a request waits for the prefills "
             "before it); decode tokens/s with prefills = tokens after each first token / time any sequence was "
             "decoding; prefills out: less the prefills run meanwhile (known for LLMEngine; transformers' "
             "continuous batching mixes prefill and decode tokens in one forward); decode steps' tokens/s = the "
             "engine's rows / its decode steps' time.", ""]
    if report.get("engines"):
        lines += ["## Engines", "", format_engines(report["engines"]), ""]
    if report.get("joining"):
        lines += ["## A request joins: the prefill whole vs in chunks", "", J.format_joining(report["joining"]), ""]
    if report.get("layers"):
        lines += ["## Per-layer cost and the 32-layer extrapolation", "", format_layers(report["layers"]), ""]
    if report.get("agreement"):
        lines += ["## Greedy agreement, batched vs one at a time", "", format_agreement(report["agreement"]), ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mofserve.benchmarks.llm_stage", description=S.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    seeded = [n for n in PROFILE_NAMES if n != "paper"]
    p.add_argument("--profile", default="paper-shaped" if "paper-shaped" in PROFILE_NAMES else "small", choices=seeded)
    p.add_argument("--sections", nargs="+", choices=S.SECTIONS, default=list(S.SECTIONS))
    p.add_argument("--sequences", type=int, default=S.DEFAULT_SEQUENCES)
    p.add_argument("--prompt-tokens", type=int, default=S.DEFAULT_PROMPT_TOKENS)
    p.add_argument("--new-tokens", type=int, default=S.DEFAULT_NEW_TOKENS)
    p.add_argument("--extrapolate-layers", type=int, default=32)
    p.add_argument("--dtype", default=None, help="the LM's dtype (default: the profile's serving dtype)")
    p.add_argument("--prefill-chunks", type=int, nargs="+", default=list(J.DEFAULT_CHUNKS),
                   help="chunk sizes of the joining section, each against 0 (the whole prompt)")
    p.add_argument("--ways", nargs="+", choices=[k for k, _ in WAYS], default=[k for k, _ in WAYS])
    p.add_argument("--agreement-profiles", nargs="+", choices=seeded, default=None,
                   help="LMs for the agreement section, each in bf16 (default: small and the --profile)")
    p.add_argument("--out", type=Path, help="results folder (default results/llm-<timestamp>/)")
    return p.parse_args(argv)


def _load(profile_name: str, dtype: str | None):
    from mofserve.core.checkpoints import resolve_profile  # lazy: core.checkpoints imports torch

    # lazy: core.language_model imports torch and transformers
    from mofserve.core.language_model import VisualLanguageModel

    profile = get_profile(profile_name)
    paths = resolve_profile(profile)
    vlm = VisualLanguageModel.from_checkpoint(paths.llava, dtype=dtype or profile.serving.llm_dtype,
                                              max_new_tokens_limit=profile.serving.max_new_tokens_limit)
    return profile, vlm


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    out = args.out or Path("results") / f"llm-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    profile, vlm = _load(args.profile, args.dtype)
    S.log(f"{profile.name}: LM {vlm.hidden_size} wide, {len(vlm.model.model.layers)} layers, {vlm.dtype}")
    report: dict = {"benchmark": "llm_stage", "profile": profile.name, "description": profile.description,
                    "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "config": vars(args) | {
                        "out": str(out)}, "machine": machine_info(), "versions": versions(), "git_commit": git_commit(),
                    "torch_threads": torch.get_num_threads(), "load_average": {"start": load_average()}}
    if "engines" in args.sections:
        requests = S.synthetic_requests(vlm, args.sequences, args.prompt_tokens, args.new_tokens)
        S.run_engine(vlm, requests[:1], 1, True)  # warm-up
        engines = report["engines"] = {"prompt_tokens": [S.prompt_length(vlm, r) for r in requests]}
        for key, _label in WAYS:
            if key not in args.ways:
                continue
            S.log(f"engines: {key} ...")
            cpu = cpu_snapshot()
            try:
                if key == "engine_batched":
                    engines[key] = S.run_engine(vlm, requests, args.sequences, together=True)
                elif key == "engine_one_at_a_time":
                    engines[key] = S.run_engine(vlm, requests, 1, together=False)
                elif key == "hf_generate":
                    engines[key] = S.run_hf_generate(vlm, requests)
                else:
                    engines[key] = S.run_hf_continuous(vlm.model, engines["prompt_tokens"], args.new_tokens)
            except Exception as error:  # one way failing (e.g. a transformers API change) keeps the others
                engines[key] = {"error": f"{type(error).__name__}: {error}"}
            report["load_average"][key] = load_average()
            r = engines[key]
            r["cpu"] = cpu_usage_since(cpu)
            if not r.get("error"):
                S.log(f"  TTFT p50 {r['ttft_ms']['p50']:.0f} ms, decode {r['decode_tokens_per_s']:.2f} tokens/s, "
                      f"output {r['output_tokens_per_s']:.2f} tokens/s")
    if "joining" in args.sections:
        S.log(f"joining: prefill chunks {args.prefill_chunks} against the whole prompt ...")
        cpu = cpu_snapshot()
        try:
            report["joining"] = J.joining(vlm, S.synthetic_requests, args.prefill_chunks)
        except Exception as error:  # keeps the other sections
            report["joining"] = {"error": f"{type(error).__name__}: {error}", "runs": {}}
        report["joining"]["cpu"] = cpu_usage_since(cpu)
        report["load_average"]["joining"] = load_average()
    if "layers" in args.sections:
        cpu = cpu_snapshot()
        report["layers"] = S.layer_costs(vlm, args.prompt_tokens, sorted({1, args.sequences}),
                                         layers=args.extrapolate_layers)
        report["layers"]["cpu"] = cpu_usage_since(cpu)
        report["load_average"]["layers"] = load_average()
    del vlm
    if "agreement" in args.sections:
        report["agreement"] = {}
        names = args.agreement_profiles or list(dict.fromkeys(["small", args.profile]))
        for name in names:
            S.log(f"agreement: {name} (bf16) ...")
            try:
                other, lm = _load(name, "bfloat16")
                report["agreement"][name] = S.agreement(lm, args.sequences,
                                                        (other.num_patches, 2 * other.num_patches))
                del lm
            except Exception as error:
                report["agreement"][name] = {"error": f"{type(error).__name__}: {error}"}
        report["load_average"]["agreement"] = load_average()
    report["load_average"]["end"] = load_average()
    write_json(out / "report.json", report, indent=1)
    text = format_report(report)
    write_text(out / "report.md", text + "\n")
    print(text)
    print(f"\nwritten: {out / 'report.json'}, {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
