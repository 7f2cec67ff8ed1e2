"""The pure half of ``mofserve eval mmvp``: what a mode is, what an answer's checkpoint record
holds and which record counts on resume, and how answers are graded and scored.

Nothing here talks to a server or writes a file, so the grading rules and the resume rules are
tested on their own; ``mmvp.py`` asks and judges, ``mmvp_report.py`` turns the grades into the
report. The rules themselves are described in ``mmvp.py``'s docstring.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mofserve.clients import ALL_MODES
from mofserve.clients.results import AskResult, Provenance
from mofserve.core.conversation import answer_to_letter, parse_options
from mofserve.core.reports import now_iso

from .datasets import MMVPItem
from .judge import verdict_correct

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
