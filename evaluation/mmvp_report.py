"""The outputs of ``mofserve eval mmvp``: ``answers.csv`` (one row per question per mode),
``report.json`` (scores per label set, mode and grading rule, with the paper's numbers beside
them) and ``report.md``, built from the graded answers of ``mmvp_scoring.py``.

It holds the paper's reference numbers because only the report compares with them; the command
(``mmvp.py``) calls ``build_report``, ``render_markdown`` and ``summary_lines`` once all answers
and verdicts are in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from mofserve.clients.results import ServerInfo
from mofserve.core.machine import machine_info
from mofserve.core.reports import markdown_table, now_iso, number

from .datasets import LABEL_FIX_PAIRS, LabelFixes, MMVPDataset, MMVPItem
from .mmvp_scoring import ModeSpec, grade, is_answer, judgement_for, score

RULES = {
    "generated": "the generated answer, mapped to an option by mofserve.core.conversation.answer_to_letter (option "
                 "marker, leading letter, 'the answer is X', or the option's text), is the correct option: the "
                 "reproducible letter-or-text matching of Cambrian / lmms-eval",
    "likelihood": "the server's chosen_option (the option label '(a) ...' with the highest mean log-probability "
                  "per token as the assistant's reply) is the correct option",
    "judge": "an LLM judge, asked the official scripts/gpt_grader.py question, answered exactly 'yes' (the "
             "paper's grading)",
}
STAGES = ("preprocess_ms", "encoders_ms", "clip_ms", "dinov2_ms", "fusion_ms", "llm_ms", "total_ms")

# The paper's MMVP pair accuracy (%), graded by its GPT-4 judge (../shared/PAPER.md).
REFERENCE_PAIR_ACCURACY = {
    "Human": 95.7, "Gemini": 40.7, "GPT-4V": 38.7, "LLaVA-1.5 + I-MoF": 28.0, "Random guess": 25.0,
    "LLaVA-1.5": 24.7, "Bard": 19.0, "InstructBLIP": 16.7, "Mini-GPT4": 12.7, "LLaVA": 6.0,
}
# A-MoF (LLaVA, not 1.5; 224 px): DINOv2 proportion -> MMVP pair accuracy.
REFERENCE_A_MOF = {0.0: 5.5, 0.25: 7.9, 0.5: 12.0, 0.625: 15.0, 0.75: 18.7, 0.875: 16.5, 1.0: 13.4}
REFERENCE_SOURCE = "Tong et al., Eyes Wide Shut? Exploring the Visual Shortcomings of Multimodal LLMs, CVPR 2024"
RANDOM_WEIGHTS_WARNING = ("RANDOM WEIGHTS: the server runs seeded random weights ({notice}); these scores measure "
                          "nothing about vision and must not be compared with the paper's")


def paper_counterpart(mode: str, alpha: float | None) -> tuple[str, float] | None:
    """The paper's closest published MMVP pair accuracy for a mode, if any."""
    if mode == "clip":
        return "LLaVA-1.5 (CLIP only)", REFERENCE_PAIR_ACCURACY["LLaVA-1.5"]
    if mode == "interleaved":
        return "LLaVA-1.5 + I-MoF", REFERENCE_PAIR_ACCURACY["LLaVA-1.5 + I-MoF"]
    if mode == "dinov2":
        return "LLaVA + A-MoF a=1 (DINOv2 only; 224 px, not 1.5)", REFERENCE_A_MOF[1.0]
    if mode == "additive" and alpha is not None:
        for a, value in REFERENCE_A_MOF.items():
            if abs(a - alpha) < 1e-9:
                return f"LLaVA + A-MoF a={a:g} (224 px, not 1.5)", value
    return None


# ---- the report ---------------------------------------------------------------------------------------


def answer_columns() -> list[str]:
    return ["index", "pair", "mode", "alpha", "question", "options", "correct", "correct_letter", "answer",
            "parsed_letter", "likelihood_letter", "generated_correct", "likelihood_correct",
            "judge_verdict", "judge_correct",
            "fixed_correct", "fixed_correct_letter", "fixed_generated_correct", "fixed_likelihood_correct",
            "fixed_judge_verdict", "fixed_judge_correct",
            *STAGES, "option_scores", "error"]


def answer_rows(label_sets: Mapping[str, Sequence[MMVPItem]], specs: Sequence[ModeSpec],
                answers: Mapping[tuple[int, str], Mapping[str, Any]],
                judgements: Mapping[str, Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """One row per question per mode (answers.csv); the ``fixed_*`` columns only with fixed labels."""
    judged = judgements is not None
    fixed_items = {i.index: i for i in label_sets.get("fixed", ())}
    rows = []
    for item in label_sets["raw"]:
        for spec in specs:
            record = answers.get((item.index, spec.key))
            g = grade(item, record, judgement_for(item, spec, record, judgements or {}), judged)
            timings = (record or {}).get("timings") or {}
            row = {"index": item.index, "pair": item.pair, "mode": spec.key,
                   "alpha": (record or {}).get("alpha") if is_answer(record) else spec.alpha,
                   "question": item.question, "options": item.options, "correct": item.correct,
                   "correct_letter": item.correct_letter, "answer": (record or {}).get("answer"),
                   "parsed_letter": g.parsed_letter, "likelihood_letter": g.likelihood_letter,
                   "generated_correct": g.generated, "likelihood_correct": g.likelihood,
                   "judge_verdict": (g.judge_verdict or "undetermined") if g.judge is not None else None,
                   "judge_correct": g.judge,
                   **{stage: timings.get(stage) for stage in STAGES},
                   "option_scores": (record or {}).get("option_scores"), "error": g.error}
            fixed = fixed_items.get(item.index)
            if fixed is not None:
                f = grade(fixed, record, judgement_for(fixed, spec, record, judgements or {}), judged)
                row.update(fixed_correct=fixed.correct, fixed_correct_letter=fixed.correct_letter,
                           fixed_generated_correct=f.generated, fixed_likelihood_correct=f.likelihood,
                           fixed_judge_verdict=(f.judge_verdict or "undetermined") if f.judge is not None else None,
                           fixed_judge_correct=f.judge)
            rows.append(row)
    return rows


def score_mode(items: Sequence[MMVPItem], spec: ModeSpec, answers: Mapping[tuple[int, str], Mapping[str, Any]],
               judgements: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    judged = judgements is not None
    graded = {item.index: grade(item, answers.get((item.index, spec.key)),
                                judgement_for(item, spec, answers.get((item.index, spec.key)), judgements or {}),
                                judged) for item in items}
    result: dict[str, Any] = {
        "generated": asdict(score({i: g.generated for i, g in graded.items()})),
        "likelihood": asdict(score({i: g.likelihood for i, g in graded.items()})),
    }
    if judged:
        result["judge"] = asdict(score({i: g.judge for i, g in graded.items()}))
    result["answered"] = sum(not g.failed for g in graded.values())
    result["unparsed_answers"] = sum(not g.failed and g.parsed_letter is None for g in graded.values())
    result["errors"] = [{"index": i, "error": g.error} for i, g in graded.items() if g.failed]
    return result


def timing_summary(items: Sequence[MMVPItem], spec: ModeSpec,
                   answers: Mapping[tuple[int, str], Mapping[str, Any]]) -> dict[str, float | None]:
    values: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for item in items:
        record = answers.get((item.index, spec.key))
        if is_answer(record) and record.get("timings"):
            for stage in STAGES:
                values[stage].append(float(record["timings"].get(stage, 0.0)))
    return {f"mean_{stage}": (sum(v) / len(v) if v else None) for stage, v in values.items()}


def build_report(*, dataset: MMVPDataset, label_sets: Mapping[str, Sequence[MMVPItem]], fixes: LabelFixes | None,
                 specs: Sequence[ModeSpec], answers: Mapping[tuple[int, str], Mapping[str, Any]],
                 judgements: Mapping[str, Mapping[str, Any]] | None, server: str, server_info: ServerInfo,
                 settings: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
    provenance = server_info.provenance
    random_weights = provenance.random_weights or any(
        (r.get("provenance") or {}).get("random_weights") for r in answers.values() if is_answer(r))
    warnings = []
    if random_weights:
        warnings.append(RANDOM_WEIGHTS_WARNING.format(notice=provenance.notice or f"profile {provenance.profile}"))
    items = label_sets["raw"]
    raw_score = score({i.index: True for i in items})
    if raw_score.incomplete_pairs:
        warnings.append(f"{len(raw_score.incomplete_pairs)} pair(s) have one question only and are left out of "
                        f"the pair accuracy: {raw_score.incomplete_pairs}")
    modes = []
    for spec in specs:
        alphas = {r.get("alpha") for (_, key), r in answers.items() if key == spec.key and is_answer(r)}
        alpha = spec.alpha if spec.alpha is not None else (alphas.pop() if len(alphas) == 1 else None)
        counterpart = paper_counterpart(spec.mode, alpha)
        modes.append({"key": spec.key, "mode": spec.mode, "requested_alpha": spec.alpha, "alpha": alpha,
                      "paper_counterpart": None if counterpart is None else
                      {"model": counterpart[0], "pair_accuracy": counterpart[1]}})
    scores = {name: {spec.key: score_mode(label_items, spec, answers, judgements) for spec in specs}
              for name, label_items in label_sets.items()}
    failed = sum(len(scores["raw"][s.key]["errors"]) for s in specs)
    if failed:
        warnings.append(f"{failed} answer(s) failed (counted wrong); see 'errors' per mode and answers.csv")
    return {
        "benchmark": "MMVP",
        "created": now_iso(),
        "random_weights": random_weights,
        "warnings": warnings,
        "dataset": {
            "path": str(dataset.root), "questions_csv": str(dataset.questions_csv),
            "images_dir": str(dataset.images_dir), "rows_in_csv": dataset.rows, "questions": len(items),
            "pairs": raw_score.pairs, "incomplete_pairs": raw_score.incomplete_pairs,
            "item_errors": [{"index": i.index, "error": i.error} for i in items if i.error],
        },
        "server": {
            "target": server, "version": server_info.version, "modes": server_info.modes,
            "default_mode": server_info.default_mode, "default_alpha": server_info.default_alpha,
            "limits": server_info.limits, "provenance": asdict(provenance),
        },
        "machine": machine_info(),
        "settings": dict(settings),
        "modes": modes,
        "grading": {name: RULES[name] for name in ("generated", "likelihood", *(("judge",) if judgements is not None
                                                                                else ()))},
        "labels": {
            "sets": list(label_sets),
            "fixes": None if fixes is None else {
                "description": "Correct Answer values swapped between Index " + " and ".join(
                    f"{a}<->{b}" for a, b in LABEL_FIX_PAIRS) + " (known label errors; lmms-eval's corrected "
                    "labels); 'raw' scores use the labels as released",
                "changes": fixes.changes, "skipped": fixes.skipped},
        },
        "scores": scores,
        "timings_ms": {spec.key: timing_summary(items, spec, answers) for spec in specs},
        "reference": {"metric": "MMVP pair accuracy (%), graded by the paper's GPT-4 judge",
                      "source": REFERENCE_SOURCE, "pair_accuracy": REFERENCE_PAIR_ACCURACY,
                      "a_mof_llava_224px": {f"{a:g}": v for a, v in REFERENCE_A_MOF.items()}},
        "run": dict(run),
    }


def _score_cells(report: Mapping[str, Any], key: str, metric: str) -> list[str]:
    cells = []
    for label_set in report["labels"]["sets"]:
        for rule in report["grading"]:
            cells.append(number(report["scores"][label_set][key][rule][metric]))
    return cells


def _score_header(report: Mapping[str, Any]) -> list[str]:
    fixed = len(report["labels"]["sets"]) > 1
    return [f"{rule}{', fixed labels' if fixed and label_set == 'fixed' else ''}"
            for label_set in report["labels"]["sets"] for rule in report["grading"]]


def render_markdown(report: Mapping[str, Any]) -> str:
    ds, server, settings = report["dataset"], report["server"], report["settings"]
    prov = server["provenance"]
    limited = f" (the first {settings['limit']} of {ds['rows_in_csv']} rows)" if settings.get("limit") else ""
    out = [f"# MMVP results ({report['created']})", ""]
    for warning in report["warnings"]:
        prefix = "**WARNING: " if warning.startswith("RANDOM WEIGHTS") else "**Note:** "
        out.append(f"> {prefix}{warning}{'**' if prefix.startswith('**WARNING') else ''}")
        out.append("")
    out += [f"- server: `{server['target']}`, mofserve {server['version']}, profile `{prov['profile']}`"
            f"{' (random weights)' if prov['random_weights'] else ''}",
            f"- dataset: `{ds['path']}`: {ds['questions']} questions, {ds['pairs']} pairs{limited}",
            f"- decoding: {settings['decoding']}; max_new_tokens: {settings['max_new_tokens'] or 'server default'}",
            f"- labels: {' and '.join(report['labels']['sets'])}", ""]
    header = _score_header(report)
    out += ["## Pair accuracy (%), the paper's metric", "",
            "A pair (Index 2p-1, 2p) scores only when both answers are right; a failed answer counts as wrong.",
            "The paper's numbers (beside each mode: the closest published model) were graded by a GPT-4 judge.", ""]
    rows = []
    for mode in report["modes"]:
        counterpart = mode["paper_counterpart"]
        rows.append([mode["key"], *_score_cells(report, mode["key"], "pair_accuracy"),
                     f"{report['scores']['raw'][mode['key']]['generated']['pairs']}",
                     counterpart["model"] if counterpart else "-",
                     number(counterpart["pair_accuracy"]) if counterpart else "-"])
    out += [markdown_table(["mode", *header, "pairs", "paper counterpart", "paper"], rows,
                           "l" + "r" * (len(header) + 1) + "lr"), ""]
    out += ["Paper reference points:", "",
            markdown_table(["model", "MMVP pair accuracy"],
                           [[name, number(REFERENCE_PAIR_ACCURACY[name])] for name in
                            ("Human", "LLaVA-1.5 + I-MoF", "Random guess", "LLaVA-1.5")]), ""]
    out += ["## Question accuracy (%)", ""]
    rows = []
    for mode in report["modes"]:
        raw = report["scores"]["raw"][mode["key"]]
        rows.append([mode["key"], *_score_cells(report, mode["key"], "question_accuracy"),
                     raw["generated"]["questions"], raw["unparsed_answers"], len(raw["errors"])])
    out += [markdown_table(["mode", *header, "questions", "answers naming no option", "failed"], rows), ""]
    out += ["## Grading", ""]
    out += [f"- **{rule}**: {text}" for rule, text in report["grading"].items()]
    out.append("")
    fixes = report["labels"]["fixes"]
    if fixes is not None:
        out += ["## Label fixes", "", fixes["description"] + ".", ""]
        out += [f"- Index {c['index']}: {c['from']} -> {c['to']}" for c in fixes["changes"]]
        out += [f"- not applied: {s}" for s in fixes["skipped"]]
        out.append("")
    failures = [(mode["key"], e) for mode in report["modes"] for e in report["scores"]["raw"][mode["key"]]["errors"]]
    if failures:
        out += [f"## Failed answers ({len(failures)})", ""]
        out += [markdown_table(["mode", "index", "error"], [[k, e["index"], e["error"]] for k, e in failures[:100]],
                               "lrl")]
        if len(failures) > 100:
            out.append(f"\n... and {len(failures) - 100} more (answers.csv, column error)")
        out.append("")
    out += ["## Mean time per answer (ms)", ""]
    out += [markdown_table(["mode", *(s.removesuffix("_ms") for s in STAGES)],
                           [[k, *(number(t[f"mean_{s}"]) for s in STAGES)]
                            for k, t in report["timings_ms"].items()]), ""]
    run = report["run"]
    out.append(f"Run: {run['requests']} request(s) this run ({run['failed_requests']} failed), "
               f"{run['reused_answers']} answer(s) reused from the checkpoint, {run['wall_s']:.1f} s.")
    return "\n".join(out) + "\n"


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """The pair accuracy table printed at the end of a run."""
    rows = []
    for mode in report["modes"]:
        counterpart = mode["paper_counterpart"]
        rows.append([mode["key"], *_score_cells(report, mode["key"], "pair_accuracy"),
                     f"{counterpart['model']}: {number(counterpart['pair_accuracy'])}" if counterpart else "-"])
    header = ["MMVP pair accuracy (%)", *_score_header(report), "paper"]
    return markdown_table(header, rows, "l" + "r" * (len(header) - 2) + "l").splitlines()
