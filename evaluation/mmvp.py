"""``mofserve eval mmvp``: the MMVP benchmark (Tong et al., CVPR 2024) against a running server.

    mofserve eval mmvp --data ~/MMVP --mode clip --mode interleaved --mode additive --alpha 0.5

Each row of ``Questions.csv`` is asked about its image through the gRPC client (one ``Ask`` per
row, or one ``Compare`` for several modes, so the encoders see the image once), ``--concurrency``
requests at a time, each with a deadline of ``--timeout`` seconds, greedy decoding (no sampling
parameter is sent). The server builds the official prompt, LLaVA-1.5's ``llava_v1`` template
around ``Question + " " + Options``, from the question and the options sent as they are written.

Grading (both are reported, per mode):
- **generated**: the generated answer is mapped to an option with
  ``mofserve.core.conversation.answer_to_letter`` (an option marker, a leading letter, "the answer
  is X", or the option's text) and is right when that is the correct option: the reproducible
  letter-or-text matching of Cambrian and lmms-eval;
- **likelihood**: the server's ``chosen_option`` (the option label with the highest mean
  log-probability as the assistant's reply) is the correct option;
- **judge** (only with ``--judge-url``): the official grader's yes/no question to an LLM.

Scores: question accuracy and pair accuracy (pair p = Index 2p-1 and 2p, right only when both
are; 150 pairs on the full set), in percent; an item that failed (bad dataset row, unreadable
image, server error) counts as wrong and is listed. ``--fix-labels`` also scores with the known
label errors fixed (see ``datasets.LABEL_FIX_PAIRS``), beside the released labels.

Resume: every answer is appended to ``<out>/answers.jsonl`` as it arrives; a rerun with the same
``--out`` asks only what has no answer yet (failed requests are retried; an answer is reused only
for the same question, options, image bytes, mode, alpha and ``--max-new-tokens``, and only from a
server with the same profile and model versions).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mofserve.clients import ALL_MODES, DEFAULT_TARGET, AsyncMofServeClient, MofServeError
from mofserve.clients.results import AskResult, Provenance, ServerInfo
from mofserve.core.conversation import answer_to_letter, parse_options
from mofserve.core.machine import machine_info
from mofserve.core.reports import markdown_table, now_iso, pct, timestamped_dir, write_csv, write_json, write_text

from .checkpoint import JsonlCheckpoint
from .datasets import LABEL_FIX_PAIRS, LabelFixes, MMVPDataset, MMVPItem, load_mmvp
from .judge import JUDGE_SYSTEM, JUDGE_TEMPERATURE, JudgeClient, judge_question, parse_judge_reply, verdict_correct

ANSWERS_JSONL = "answers.jsonl"
JUDGEMENTS_JSONL = "judgements.jsonl"
ANSWERS_CSV = "answers.csv"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"

RULES = {
    "generated": "the generated answer, mapped to an option by mofserve.core.conversation.answer_to_letter (option "
                 "marker, leading letter, 'the answer is X', or the option's text), is the correct option: the "
                 "reproducible letter-or-text matching of Cambrian / lmms-eval",
    "likelihood": "the server's chosen_option (the option label '(a) ...' with the highest mean log-probability "
                  "per token as the assistant's reply) is the correct option",
    "judge": "an LLM judge, asked the official scripts/gpt_grader.py question, answered exactly 'yes' (the "
             "paper's grading)",
}
BOTH_ENCODERS = ("additive", "interleaved")  # modes that need CLIP and DINOv2 features
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


# ---- modes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModeSpec:
    mode: str
    alpha: float | None = None  # additive only; None: the server's default

    @property
    def key(self) -> str:
        """How answers, columns and reports name it: ``clip``, ``additive``, ``additive:0.5``."""
        return self.mode if self.alpha is None else f"{self.mode}:{self.alpha:g}"

    @property
    def selection(self) -> str | tuple[str, float]:
        return self.mode if self.alpha is None else (self.mode, self.alpha)


def parse_mode(text: str) -> ModeSpec:
    """``clip``, ``dinov2``, ``additive``, ``interleaved`` or ``additive:ALPHA``."""
    mode, sep, alpha_text = text.strip().partition(":")
    if mode not in ALL_MODES:
        raise ValueError(f"--mode: unknown mode {mode!r}; expected one of {', '.join(ALL_MODES)} "
                         "(or additive:ALPHA)")
    if not sep:
        return ModeSpec(mode)
    if mode != "additive":
        raise ValueError(f"--mode {text}: only the additive mode takes an alpha")
    try:
        alpha = float(alpha_text)
    except ValueError:
        raise ValueError(f"--mode {text}: alpha must be a number in [0, 1]") from None
    return ModeSpec(mode, _check_alpha(alpha, f"--mode {text}"))


def _check_alpha(alpha: float, where: str) -> float:
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"{where}: alpha must be within [0, 1], got {alpha:g}")
    return alpha


def mode_specs(modes: Sequence[str | ModeSpec], alpha: float | None = None) -> list[ModeSpec]:
    """The modes to evaluate; ``alpha`` goes to every bare ``additive``."""
    specs = [m if isinstance(m, ModeSpec) else parse_mode(m) for m in modes]
    if not specs:
        raise ValueError("--mode: give at least one mode")
    if alpha is not None:
        _check_alpha(alpha, "--alpha")
        if not any(s.mode == "additive" for s in specs):
            raise ValueError("--alpha: applies to the additive mode only, and no --mode additive was given")
        specs = [ModeSpec(s.mode, alpha) if s.mode == "additive" and s.alpha is None else s for s in specs]
    keys = [s.key for s in specs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"--mode: {', '.join(duplicates)} given twice")
    return specs


# ---- answers: checkpoint records and resume ------------------------------------------------------------


def provenance_dict(provenance: Provenance) -> dict[str, Any]:
    return {"profile": provenance.profile, "random_weights": provenance.random_weights,
            "model_versions": dict(provenance.model_versions)}


def answer_record(item: MMVPItem, spec: ModeSpec, max_new_tokens: int | None, provenance: Mapping[str, Any],
                  result: AskResult | None = None, error: str | None = None) -> dict[str, Any]:
    """One checkpoint line: what was asked (to recognise it on resume) and what came back."""
    record: dict[str, Any] = {
        "index": item.index, "mode_key": spec.key, "mode": spec.mode, "requested_alpha": spec.alpha,
        "question": item.question, "options": item.options, "image_sha256": item.image_sha256,
        "max_new_tokens": max_new_tokens, "at": now_iso(), "error": error,
        "answer": None, "chosen_option": None, "option_scores": None, "alpha": None, "timings": None,
        "provenance": dict(provenance),
    }
    if result is not None:
        record.update(answer=result.answer, chosen_option=result.chosen_option,
                      option_scores=list(result.option_scores), alpha=result.alpha,
                      timings=asdict(result.timings), provenance=provenance_dict(result.provenance))
    return record


def record_matches(record: Mapping[str, Any], item: MMVPItem, spec: ModeSpec, max_new_tokens: int | None) -> bool:
    """Whether a checkpoint record answers this exact request (else it is stale and asked again)."""
    return (record.get("index") == item.index and record.get("mode_key") == spec.key
            and record.get("question") == item.question and record.get("options") == item.options
            and record.get("image_sha256") == item.image_sha256 and record.get("max_new_tokens") == max_new_tokens)


def is_answer(record: Mapping[str, Any] | None) -> bool:
    return record is not None and not record.get("error") and isinstance(record.get("answer"), str)


def select_records(records: Iterable[Mapping[str, Any]], items: Sequence[MMVPItem], specs: Sequence[ModeSpec],
                   max_new_tokens: int | None) -> dict[tuple[int, str], dict[str, Any]]:
    """The record to use per (index, mode key): the latest answer, else the latest error; records
    that do not match the item (dataset or settings changed) are ignored."""
    by_index = {item.index: item for item in items}
    by_key = {spec.key: spec for spec in specs}
    chosen: dict[tuple[int, str], dict[str, Any]] = {}
    for record in records:
        item, spec = by_index.get(record.get("index")), by_key.get(record.get("mode_key"))
        if item is None or spec is None or not record_matches(record, item, spec, max_new_tokens):
            continue
        key = (item.index, spec.key)
        if is_answer(record) or not is_answer(chosen.get(key)):
            chosen[key] = dict(record)
    return chosen


def check_provenance(records: Iterable[Mapping[str, Any]], provenance: Mapping[str, Any], path: Path) -> None:
    """Refuse to mix answers of different models in one output folder."""
    for record in records:
        if not is_answer(record):
            continue
        theirs = record.get("provenance") or {}
        if (theirs.get("profile"), theirs.get("model_versions") or {}) != (provenance["profile"],
                                                                           provenance["model_versions"]):
            raise ValueError(f"{path}: holds answers from profile {theirs.get('profile')!r} (model versions "
                             f"{theirs.get('model_versions')}), but the server now serves profile "
                             f"{provenance['profile']!r} ({provenance['model_versions']}); use another --out")


def pending_work(items: Sequence[MMVPItem], specs: Sequence[ModeSpec],
                 chosen: Mapping[tuple[int, str], Mapping[str, Any]]) -> list[tuple[MMVPItem, list[ModeSpec]]]:
    """Per askable item, the modes that have no answer yet (items with a dataset error are never asked)."""
    work = []
    for item in items:
        if item.error:
            continue
        missing = [s for s in specs if not is_answer(chosen.get((item.index, s.key)))]
        if missing:
            work.append((item, missing))
    return work


# ---- grading and scores (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Graded:
    """One answer graded against one set of labels; the booleans are None when the item failed."""

    error: str | None
    parsed_letter: str | None
    likelihood_letter: str | None
    generated: bool | None
    likelihood: bool | None
    judge_verdict: str | None = None
    judge: bool | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


def grade(item: MMVPItem, record: Mapping[str, Any] | None,
          judgement: Mapping[str, Any] | None = None, judged: bool = False) -> Graded:
    """Grade an answer by both rules (and by the judge when ``judged``) against ``item``'s label."""
    if item.error:
        return Graded(item.error, None, None, None, None)
    if record is None:
        return Graded("not asked (the run was interrupted?)", None, None, None, None)
    if not is_answer(record):
        return Graded(record.get("error") or "no answer", None, None, None, None)
    parsed = answer_to_letter(record["answer"], parse_options(item.options))
    chosen = record.get("chosen_option") or None
    verdict, judge_ok = None, None
    if judged and judgement is not None and not judgement.get("error"):
        verdict = judgement.get("verdict")
        judge_ok = verdict_correct(verdict)
    return Graded(None, parsed, chosen, parsed == item.correct_letter, chosen == item.correct_letter,
                  verdict, judge_ok)


@dataclass(frozen=True)
class Score:
    questions: int
    questions_correct: int
    question_accuracy: float | None  # percent
    pairs: int
    pairs_correct: int
    pair_accuracy: float | None  # percent: the paper's metric
    failed: list[int]  # indices graded None (counted wrong)
    failed_pairs: list[list[int]]  # complete pairs with a failed member (counted wrong)
    incomplete_pairs: list[list[int]]  # pairs with one member only (not in the pair score)


def _percent(part: int, whole: int) -> float | None:
    return 100.0 * part / whole if whole else None


def score(outcomes: Mapping[int, bool | None]) -> Score:
    """Question and pair accuracy of ``{index: right?}`` (None: failed, counted wrong). Pair p is
    Index 2p-1 and 2p; a pair with only one of them present is incomplete and left out."""
    failed = sorted(i for i, ok in outcomes.items() if ok is None)
    pairs: dict[int, list[int]] = defaultdict(list)
    for index in outcomes:
        pairs[(index + 1) // 2].append(index)
    complete = {p: sorted(m) for p, m in pairs.items() if len(m) == 2}
    incomplete = [sorted(m) for p, m in sorted(pairs.items()) if len(m) != 2]
    pairs_correct = sum(all(outcomes[i] is True for i in members) for members in complete.values())
    failed_pairs = [members for _, members in sorted(complete.items()) if any(outcomes[i] is None for i in members)]
    right = sum(ok is True for ok in outcomes.values())
    return Score(len(outcomes), right, _percent(right, len(outcomes)), len(complete), pairs_correct,
                 _percent(pairs_correct, len(complete)), failed, failed_pairs, incomplete)


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


# ---- judge work -------------------------------------------------------------------------------------


def judgement_key(index: int, mode_key: str, correct: str, answer: str) -> str:
    return "\x1f".join((str(index), mode_key, correct, answer))


def select_judgements(records: Iterable[Mapping[str, Any]], model: str) -> dict[str, dict[str, Any]]:
    """Per judgement key, the latest successful verdict of ``model`` (else the latest error)."""
    chosen: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.get("model") != model:
            continue
        key = judgement_key(record.get("index"), record.get("mode_key"), record.get("correct"), record.get("answer"))
        if not record.get("error") or chosen.get(key, {}).get("error", True):
            chosen[key] = dict(record)
    return chosen


def judgement_for(item: MMVPItem, spec: ModeSpec, answer: Mapping[str, Any] | None,
                  judgements: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any] | None:
    if item.error or not is_answer(answer):
        return None
    return judgements.get(judgement_key(item.index, spec.key, item.correct, answer["answer"]))


def judge_work(label_sets: Mapping[str, Sequence[MMVPItem]], specs: Sequence[ModeSpec],
               answers: Mapping[tuple[int, str], Mapping[str, Any]],
               judgements: Mapping[str, Mapping[str, Any]]) -> list[tuple[MMVPItem, ModeSpec, str]]:
    """(item, mode, answer) still to be judged, for every label set (a fixed label is a new question)."""
    work, seen = [], set()
    for items in label_sets.values():
        for item in items:
            for spec in specs:
                answer = answers.get((item.index, spec.key))
                if item.error or not is_answer(answer):
                    continue
                key = judgement_key(item.index, spec.key, item.correct, answer["answer"])
                if key in seen or not judgements.get(key, {"error": True}).get("error"):
                    continue
                seen.add(key)
                work.append((item, spec, answer["answer"]))
    return work


# ---- asking -------------------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="q", file=sys.stderr, disable=not enabled or total == 0,
                dynamic_ncols=True)


def compare_order(specs: Sequence[ModeSpec]) -> list[ModeSpec]:
    """A mode that runs both encoders first: Compare runs its first mode alone and the others from
    the encoders' feature cache, so each encoder then sees the image once."""
    return sorted(specs, key=lambda s: s.mode not in BOTH_ENCODERS)


async def ask_item(client: AsyncMofServeClient, item: MMVPItem, specs: Sequence[ModeSpec], *,
                   max_new_tokens: int | None, timeout: float, provenance: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Ask one item in ``specs`` (Ask for one mode, Compare for several); never raises."""
    try:
        image = item.image.read_bytes()
        if len(specs) == 1:
            spec = specs[0]
            results = [await client.ask(image, item.question, item.options, mode=spec.mode, alpha=spec.alpha,
                                        max_new_tokens=max_new_tokens, timeout=timeout)]
        else:
            specs = compare_order(specs)
            results = await client.compare(image, item.question, item.options, modes=[s.selection for s in specs],
                                           max_new_tokens=max_new_tokens, timeout=timeout)
        if len(results) != len(specs):
            raise RuntimeError(f"the server answered {len(results)} modes for {len(specs)} asked")
    except MofServeError as error:
        message = f"{error.code.name}: {error.message}"
        return [answer_record(item, s, max_new_tokens, provenance, error=message) for s in specs]
    except Exception as error:  # a failed item is recorded, the run goes on
        message = f"{type(error).__name__}: {error}"
        return [answer_record(item, s, max_new_tokens, provenance, error=message) for s in specs]
    return [answer_record(item, s, max_new_tokens, provenance, result=r) for s, r in zip(specs, results, strict=True)]


async def ask_all(client: AsyncMofServeClient, work: Sequence[tuple[MMVPItem, list[ModeSpec]]],
                  checkpoint: JsonlCheckpoint, *, concurrency: int, timeout: float, max_new_tokens: int | None,
                  provenance: Mapping[str, Any], progress: bool = True) -> dict[str, int]:
    """Ask every (item, modes) of ``work``, at most ``concurrency`` at a time, appending each
    answer to ``checkpoint`` as it arrives. Returns request and failure counts."""
    semaphore = asyncio.Semaphore(concurrency)
    counts = {"requests": 0, "failed_requests": 0}
    bar = _progress(len(work), "MMVP", progress)

    async def one(item: MMVPItem, specs: list[ModeSpec]) -> None:
        async with semaphore:
            records = await ask_item(client, item, specs, max_new_tokens=max_new_tokens, timeout=timeout,
                                     provenance=provenance)
        counts["requests"] += 1
        counts["failed_requests"] += bool(records[0]["error"])
        for record in records:
            checkpoint.append(record)
        bar.update(1)

    try:
        await asyncio.gather(*(one(item, specs) for item, specs in work))
    finally:
        bar.close()
    return counts


async def judge_all(judge: JudgeClient, work: Sequence[tuple[MMVPItem, ModeSpec, str]],
                    checkpoint: JsonlCheckpoint, *, concurrency: int, progress: bool = True) -> int:
    semaphore = asyncio.Semaphore(concurrency)
    bar = _progress(len(work), "judge", progress)

    async def one(item: MMVPItem, spec: ModeSpec, answer: str) -> None:
        reply, error = None, None
        async with semaphore:
            try:
                reply = await judge.reply(item.prompt, item.correct, answer)
            except Exception as exc:  # recorded; the item counts as failed under the judge rule
                error = f"{type(exc).__name__}: {exc}"
        checkpoint.append({"index": item.index, "mode_key": spec.key, "correct": item.correct, "answer": answer,
                           "model": judge.model, "reply": reply, "verdict": parse_judge_reply(reply),
                           "error": error, "at": now_iso()})
        bar.update(1)

    try:
        await asyncio.gather(*(one(*entry) for entry in work))
    finally:
        bar.close()
    return len(work)


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
            cells.append(pct(report["scores"][label_set][key][rule][metric]))
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
                     pct(counterpart["pair_accuracy"]) if counterpart else "-"])
    out += [markdown_table(["mode", *header, "pairs", "paper counterpart", "paper"], rows,
                           "l" + "r" * (len(header) + 1) + "lr"), ""]
    out += ["Paper reference points:", "",
            markdown_table(["model", "MMVP pair accuracy"],
                           [[name, pct(REFERENCE_PAIR_ACCURACY[name])] for name in
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
                           [[k, *(pct(t[f"mean_{s}"]) for s in STAGES)] for k, t in report["timings_ms"].items()]), ""]
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
                     f"{counterpart['model']}: {pct(counterpart['pair_accuracy'])}" if counterpart else "-"])
    header = ["MMVP pair accuracy (%)", *_score_header(report), "paper"]
    return markdown_table(header, rows, "l" + "r" * (len(header) - 2) + "l").splitlines()


# ---- the run --------------------------------------------------------------------------------------


@dataclass
class MMVPConfig:
    data: Path
    specs: list[ModeSpec]
    server: str = DEFAULT_TARGET
    out: Path | None = None
    concurrency: int = 4
    timeout: float = 300.0
    max_new_tokens: int | None = None
    fix_labels: bool = False
    limit: int | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_client_settings(self.concurrency, self.timeout)
        if bool(self.judge_url) != bool(self.judge_model):
            raise ValueError("--judge-url and --judge-model go together")


@dataclass
class MMVPRun:
    out: Path
    report: dict[str, Any]
    paths: dict[str, Path]


def check_server(info: ServerInfo, specs: Sequence[ModeSpec], max_new_tokens: int | None, server: str) -> None:
    """Refuse, before asking anything, what the server would refuse for every item."""
    unknown = [s.key for s in specs if s.mode not in info.modes]
    if unknown:
        raise ValueError(f"--mode: the server at {server} does not serve {', '.join(unknown)} "
                         f"(it serves {', '.join(info.modes)})")
    most = info.limits.get("max_compare_modes")
    if most and len(specs) > most:
        raise ValueError(f"--mode: {len(specs)} modes, but the server at {server} compares at most {most} at once")
    limit = info.limits.get("max_new_tokens")
    if max_new_tokens and limit and max_new_tokens > limit:
        raise ValueError(f"--max-new-tokens: {max_new_tokens} is over the server's limit of {limit}")


async def run_mmvp_async(config: MMVPConfig, log=None) -> MMVPRun:
    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    dataset = load_mmvp(config.data, config.limit)
    label_sets: dict[str, Sequence[MMVPItem]] = {"raw": dataset.items}
    fixes = None
    if config.fix_labels:
        label_sets["fixed"], fixes = dataset.label_fixed()
    out = Path(config.out) if config.out else timestamped_dir("mmvp")
    out.mkdir(parents=True, exist_ok=True)
    bad_items = sum(item.error is not None for item in dataset.items)
    if bad_items:
        log(f"mofserve eval mmvp: {bad_items} item(s) cannot be asked (counted as failed), e.g. "
            f"{next(i.error for i in dataset.items if i.error)}")

    async with AsyncMofServeClient(config.server, timeout=config.timeout) as client:
        info = await client.server_info(timeout=min(config.timeout, 30.0))
        check_server(info, config.specs, config.max_new_tokens, config.server)
        provenance = provenance_dict(info.provenance)
        if info.provenance.random_weights:
            log("mofserve eval mmvp: WARNING: " + RANDOM_WEIGHTS_WARNING.format(
                notice=info.provenance.notice or f"profile {info.provenance.profile}"))
        with JsonlCheckpoint(out / ANSWERS_JSONL) as checkpoint:
            previous = checkpoint.load()
            if checkpoint.bad_lines:
                log(f"mofserve eval mmvp: {checkpoint.path}: skipped unreadable line(s) {checkpoint.bad_lines}")
            check_provenance(previous, provenance, checkpoint.path)
            chosen = select_records(previous, dataset.items, config.specs, config.max_new_tokens)
            reused = sum(is_answer(r) for r in chosen.values())
            work = pending_work(dataset.items, config.specs, chosen)
            if reused:
                log(f"mofserve eval mmvp: resuming {out}: {reused} answer(s) done, {len(work)} question(s) to ask")
            counts = await ask_all(client, work, checkpoint, concurrency=config.concurrency, timeout=config.timeout,
                                   max_new_tokens=config.max_new_tokens, provenance=provenance,
                                   progress=config.progress)
            answers = select_records(checkpoint.load(), dataset.items, config.specs, config.max_new_tokens)

    judgements = None
    judged = 0
    if config.judge_url:
        judge = JudgeClient(config.judge_url, config.judge_model, timeout=config.timeout)
        try:
            with JsonlCheckpoint(out / JUDGEMENTS_JSONL) as checkpoint:
                previous = select_judgements(checkpoint.load(), config.judge_model)
                work = judge_work(label_sets, config.specs, answers, previous)
                judged = await judge_all(judge, work, checkpoint, concurrency=config.concurrency,
                                         progress=config.progress)
                judgements = select_judgements(checkpoint.load(), config.judge_model)
        finally:
            await judge.close()

    settings = {
        "modes": [s.key for s in config.specs], "alpha": next((s.alpha for s in config.specs if s.alpha is not None),
                                                               None),
        "concurrency": config.concurrency, "timeout_s": config.timeout, "max_new_tokens": config.max_new_tokens,
        "decoding": "greedy (the server's default: no sampling parameter sent)",
        "prompt": "llava_v1 template around Question + ' ' + Options, built by the server",
        "limit": config.limit, "fix_labels": config.fix_labels,
        "judge": None if not config.judge_url else {"url": config.judge_url, "model": config.judge_model,
                                                    "system": JUDGE_SYSTEM, "temperature": JUDGE_TEMPERATURE,
                                                    "question": judge_question("{prompt}", "{correct}",
                                                                               "{response}")},
    }
    run = {**counts, "reused_answers": reused, "judged": judged, "wall_s": time.perf_counter() - started,
           "out": str(out)}
    report = build_report(dataset=dataset, label_sets=label_sets, fixes=fixes, specs=config.specs, answers=answers,
                          judgements=judgements, server=config.server, server_info=info, settings=settings, run=run)
    paths = {"answers_csv": out / ANSWERS_CSV, "report_json": out / REPORT_JSON, "report_md": out / REPORT_MD,
             "answers_jsonl": out / ANSWERS_JSONL}
    write_csv(paths["answers_csv"], answer_columns(), answer_rows(label_sets, config.specs, answers, judgements))
    write_json(paths["report_json"], report)
    write_text(paths["report_md"], render_markdown(report))
    return MMVPRun(out, report, paths)


def run_mmvp(config: MMVPConfig, log=None) -> MMVPRun:
    return asyncio.run(run_mmvp_async(config, log))


# ---- command line ------------------------------------------------------------------------------------


def check_client_settings(concurrency: int, timeout: float) -> None:
    """The settings every evaluator's client loop shares, checked before any request is sent."""
    if concurrency < 1:
        raise ValueError(f"--concurrency: must be at least 1, got {concurrency}")
    if not timeout > 0:
        raise ValueError(f"--timeout: must be positive, got {timeout}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _mode_arg(text: str) -> ModeSpec:
    try:
        return parse_mode(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mofserve eval mmvp``."""
    parser.add_argument("--data", type=Path, required=True,
                        help="MMVP folder: 'MMVP Images/1.jpg..300.jpg' and Questions.csv")
    parser.add_argument("--mode", dest="modes", type=_mode_arg, action="append", required=True, metavar="MODE",
                        help="clip, dinov2, additive, interleaved or additive:ALPHA; repeat for several "
                             "(asked together with Compare: the encoders run once per image)")
    parser.add_argument("--alpha", type=float, help="DINOv2 proportion for --mode additive, in [0, 1] "
                                                    "(default: the server's)")
    parser.add_argument("--server", default=DEFAULT_TARGET, help=f"gRPC address (default {DEFAULT_TARGET})")
    parser.add_argument("--out", type=Path, help="output folder (default results/mmvp-<timestamp>); "
                                                 "rerun with the same folder to resume")
    parser.add_argument("--concurrency", type=positive_int, default=4, help="requests in flight (default 4)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline per request, seconds (default 300)")
    parser.add_argument("--max-new-tokens", type=positive_int, help="answer length limit (default: the server's)")
    parser.add_argument("--fix-labels", action="store_true",
                        help="also score with the known label errors fixed (Correct Answer of Index 99<->100 and "
                             "279<->280 swapped); both raw and fixed scores are reported")
    parser.add_argument("--limit", type=positive_int, help="only the first N rows of Questions.csv")
    parser.add_argument("--judge-url", help="OpenAI-compatible base URL of an optional LLM judge "
                                            "(key from OPENAI_API_KEY)")
    parser.add_argument("--judge-model", help="the judge's model name (with --judge-url)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    """``mofserve eval mmvp``: ask, score and write the report the flags describe."""
    config = MMVPConfig(data=args.data, specs=mode_specs(args.modes, args.alpha), server=args.server, out=args.out,
                        concurrency=args.concurrency, timeout=args.timeout, max_new_tokens=args.max_new_tokens,
                        fix_labels=args.fix_labels, limit=args.limit, judge_url=args.judge_url,
                        judge_model=args.judge_model, progress=not args.no_progress)
    try:
        result = run_mmvp(config)
    except MofServeError as error:
        print(f"mofserve eval mmvp: server {config.server}: {error}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(result.report)))
    for warning in result.report["warnings"]:
        print(f"{'WARNING' if warning.startswith('RANDOM') else 'note'}: {warning}", file=sys.stderr)
    print(f"wrote {result.paths['report_md']}, {result.paths['report_json']}, {result.paths['answers_csv']}")
    return 0
