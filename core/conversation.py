"""Prompts and multiple-choice options: the one home of how a question becomes LLM text and
how a free-text answer becomes an option letter.

The prompt is LLaVA-1.5's ``llava_v1`` conversation (``SeparatorStyle.TWO``, sep ``" "``) built
exactly as the official MMVP script (``scripts/evaluate_mllm.py``) builds it: the user turn is
``"<image>\\n" + Question + " " + Options`` and the prompt ends with ``"ASSISTANT:"``. For MMVP
row 279 that is::

    A chat between a curious human and an artificial intelligence assistant. The assistant gives
    helpful, detailed, and polite answers to the human's questions. USER: <image>
    Is the elderly person standing or sitting in the picture? (a) Standing (b) Sitting ASSISTANT:

(one line but for the newline after ``<image>``). Options come as MMVP writes them,
``"(a) Standing (b) Sitting"`` (passed into the prompt verbatim), or as a JSON list of strings
``["Standing", "Sitting"]`` (lettered a, b, ... and written into the prompt MMVP-style).

``answer_to_letter`` is the grading rule shared by the server and the MMVP evaluator: it maps
"(a)", "a", "A.", "Standing", "The answer is (b) Sitting" ... to a letter, or to None when the
answer names no option or names several.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import FieldError

IMAGE_PLACEHOLDER = "<image>"
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
ROLES = ("USER", "ASSISTANT")
SEP = " "  # after the system text and the user turn (llava_v1's sep; sep2 "</s>" ends assistant turns)
STOP = "</s>"

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_MARKER = re.compile(r"\(\s*([A-Za-z])\s*\)")
_EXPECTED = "expected MMVP-style '(a) ... (b) ...' with at least two options"


@dataclass(frozen=True)
class Option:
    letter: str  # lower case: "a", "b", ...
    text: str  # without its marker: "Standing"

    @property
    def label(self) -> str:
        """The option as MMVP writes it and as the assistant would say it: ``"(a) Standing"``."""
        return f"({self.letter}) {self.text}"


def _shown(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _clean(text: str) -> str:
    """Collapse whitespace (newlines included) and drop separators left between options."""
    return " ".join(text.split()).strip(" ,;|")


def _parse_json_options(text: str) -> list[Option]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise FieldError("options", f"not valid JSON ({error.msg}); expected a list of strings such as "
                         f'["Standing", "Sitting"] or MMVP-style \'(a) ... (b) ...\'') from None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise FieldError("options", "expected a JSON list of strings such as [\"Standing\", \"Sitting\"]")
    if not 2 <= len(items) <= len(_LETTERS):
        raise FieldError("options", f"expected a JSON list of 2 to {len(_LETTERS)} options, got {len(items)}")
    options = []
    for letter, item in zip(_LETTERS, items, strict=False):
        marker = _MARKER.match(item.strip())
        if marker and marker.group(1).lower() == letter:  # ["(a) Standing", ...]: drop the marker
            item = item.strip()[marker.end():]
        if not _clean(item):
            raise FieldError("options", f"option ({letter}) is empty; expected a JSON list of non-empty strings")
        options.append(Option(letter, _clean(item)))
    return options


def parse_options(options: str) -> list[Option]:
    """``"(a) Standing (b) Sitting"`` -> ``[Option("a", "Standing"), Option("b", "Sitting")]``.

    Markers may be upper case, spaced (``( B )``) or separated by newlines; letters must run
    a, b, c, ... in order (a ``(c)`` inside option (a)'s text stays text). A JSON list of strings
    is lettered in order. Raises ValueError naming ``options`` and what was expected.
    """
    if not isinstance(options, str):
        raise FieldError("options", f"expected a string, got {type(options).__name__}")
    text = options.strip()
    if text.startswith("["):
        return _parse_json_options(text)
    markers = []
    for match in _MARKER.finditer(text):
        if len(markers) < len(_LETTERS) and match.group(1).lower() == _LETTERS[len(markers)]:
            markers.append(match)
    if len(markers) < 2:
        raise FieldError("options", f"{_EXPECTED}, got {_shown(text)}")
    if markers[0].start() != 0:
        raise FieldError("options", f"{_EXPECTED}; unexpected text {_shown(text[:markers[0].start()].strip())} "
                         "before '(a)'")
    parsed = []
    for i, match in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
        body = _clean(text[match.end():end])
        letter = _LETTERS[i]
        if not body:
            raise FieldError("options", f"option ({letter}) has no text; {_EXPECTED}, got {_shown(text)}")
        parsed.append(Option(letter, body))
    return parsed


def options_text(options: str) -> str:
    """How ``options`` appear in the prompt: MMVP strings verbatim (stripped), JSON lists MMVP-style."""
    text = options.strip()
    if text.startswith("["):
        return " ".join(o.label for o in parse_options(text))
    return text


def check_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise FieldError("question", "empty; ask something about the image")
    if IMAGE_PLACEHOLDER in question:
        raise FieldError("question", f"must not contain the {IMAGE_PLACEHOLDER} placeholder (the image goes there)")
    return question.strip()


def user_turn(question: str, options: str | None = None) -> str:
    """``"<image>\\n" + Question (+ " " + Options)``, as the official MMVP script builds it."""
    text = check_question(question)
    if options is not None and options.strip():
        if IMAGE_PLACEHOLDER in options:
            raise FieldError("options", f"must not contain the {IMAGE_PLACEHOLDER} placeholder")
        text = text + " " + options_text(options)
    return IMAGE_PLACEHOLDER + "\n" + text


def build_prompt(question: str, options: str | None = None) -> str:
    """The llava_v1 prompt for one question, ending with ``"ASSISTANT:"`` (the model continues it)."""
    user, assistant = ROLES
    return SYSTEM + SEP + user + ": " + user_turn(question, options) + SEP + assistant + ":"


def split_prompt(prompt: str) -> tuple[str, str]:
    """The text before and after the single ``<image>`` placeholder (visual tokens go between)."""
    before, found, after = prompt.partition(IMAGE_PLACEHOLDER)
    if not found or IMAGE_PLACEHOLDER in after:
        raise ValueError(f"prompt: expected exactly one {IMAGE_PLACEHOLDER} placeholder")
    return before, after


def clean_answer(text: str) -> str:
    """A decoded answer without surrounding space or llava_v1's ``</s>`` stop string."""
    text = text.strip()
    if text.endswith(STOP):
        text = text[:-len(STOP)]
    return text.strip()


# ---- grading: free text -> option letter ---------------------------------------------------

_LEADING_LETTER = re.compile(r"^\W*([A-Za-z])\s*(?:[.):,\]]|$)")
_SAID_LETTER = re.compile(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*([A-Za-z])\s*(?:[.),:]|$)",
                          re.IGNORECASE)


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def answer_to_letter(answer: str, options: Sequence[Option] | str) -> str | None:
    """The option letter an answer names, or None if it names none or several.

    In order: an option marker ("(b)", "( B )"; several different markers count only if the
    answer starts with one), a bare leading letter ("a", "A.", "b)"), "answer/option is X", and
    finally the option text as whole words ("Standing"; when several match, an option whose
    text holds another's, such as "Not open" over "Open", wins; otherwise None).
    """
    if isinstance(options, str):
        options = parse_options(options)
    letters = {o.letter for o in options}
    text = (answer or "").strip()
    if not text:
        return None
    marks = [(m.start(), m.group(1).lower()) for m in _MARKER.finditer(text) if m.group(1).lower() in letters]
    if marks:
        distinct = {letter for _, letter in marks}
        if len(distinct) == 1:
            return marks[0][1]
        if marks[0][0] == len(text) - len(text.lstrip("\"'*`[ ")):
            return marks[0][1]
        return None
    for pattern in (_LEADING_LETTER, _SAID_LETTER):
        match = pattern.search(text)
        if match and match.group(1).lower() in letters:
            return match.group(1).lower()
    said = _words(text)
    if not said:
        return None
    for option in options:
        if _words(option.text) == said:
            return option.letter
    found = [o for o in options if _words(o.text) and re.search(rf"\b{re.escape(_words(o.text))}\b", said)]
    found = [o for o in found if not any(o is not p and _words(o.text) in _words(p.text) for p in found)]
    return found[0].letter if len(found) == 1 else None
