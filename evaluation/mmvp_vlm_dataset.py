"""The MMVP-VLM dataset on disk (HF ``MMVP/MMVP_VLM``, as the official ``scripts/evaluate_vlm.py``
reads it): questions, their nine visual patterns, their images, and the 135 pairs they form.

    DIR/Questions.csv                       Question ID,Type,Statement   (also qid,qtype,statement)
    DIR/MLLM_VLM Images/<Type>/<qid>.jpg    e.g. "MLLM_VLM Images/Orientation/1.jpg"

The image folder may also be ``MMVP_VLM_Images/`` (the repository README's name), another of
``IMAGE_DIRS``, or DIR itself; a ``<Type>`` folder may be named by the CSV's Type or by any alias
of its visual pattern (``Camera_Perspective``, ``Viewpoint and Perspective``...); images may be
``.jpg``, ``.jpeg`` or ``.png``. Questions ``2k-1`` and ``2k`` form pair k.

A missing folder or CSV, an unknown header or missing column, a qid that is not a positive integer
or appears twice, or a Type that names none of the nine patterns raises ``DatasetError`` naming
the file and line; a pair with a problem of its own carries its ``error`` (mmvp_vlm counts it
wrong). Its own module so that the command (``mmvp_vlm.py``: asking the server, scoring, the
report) stays one concern.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .datasets import DatasetError, check_image, display_path, find_csv, open_csv

# The nine visual patterns in the paper's (and the official script's) order, and what folders and
# CSV Types may call them. The released CSV's Types are the short names (Orientation, Presence,
# State, Quantity, Spatial, Color, Structural Character, Text, Camera Perspective).
TEXT_PROMPT = "a photo of "  # the official script's text: the prompt + the statement
PATTERNS = (
    "Orientation and Direction", "Presence of Specific Features", "State and Condition", "Quantity and Count",
    "Positional and Relational Context", "Color and Appearance", "Structural Characteristics", "Texts",
    "Viewpoint and Perspective",
)
PATTERN_ALIASES = {
    "Orientation and Direction": ("Orientation", "Direction"),
    "Presence of Specific Features": ("Presence", "Specific Features"),
    "State and Condition": ("State", "Condition"),
    "Quantity and Count": ("Quantity", "Count"),
    "Positional and Relational Context": ("Spatial", "Positional", "Position", "Relational Context"),
    "Color and Appearance": ("Color", "Colour", "Appearance", "Colour and Appearance"),
    "Structural Characteristics": ("Structural Character", "Structural", "Structure"),
    "Texts": ("Text",),
    "Viewpoint and Perspective": ("Camera Perspective", "Viewpoint", "Perspective", "Camera"),
}
QUESTIONS_CSV = "Questions.csv"
IMAGE_DIRS = ("MLLM_VLM Images", "MMVP_VLM_Images", "MLLM_VLM_Images", "MMVP_VLM Images", "MMVP VLM Images",
              "images")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
COLUMN_ALIASES = {  # the official file's header first
    "qid": ("Question ID", "qid", "question_id", "id", "index", "lndex"),
    "qtype": ("Type", "qtype", "pattern", "category", "visual pattern"),
    "statement": ("Statement", "statement", "text", "caption"),
}


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_PATTERN_BY_KEY = {_key(alias): pattern for pattern in PATTERNS for alias in (pattern, *PATTERN_ALIASES[pattern])}


def pattern_of(name: str) -> str | None:
    """The canonical visual pattern a CSV Type or folder name stands for (None: none)."""
    return _PATTERN_BY_KEY.get(_key(name))


# ---- the dataset ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    qid: int
    qtype: str  # as written in the CSV
    pattern: str  # canonical (PATTERNS)
    statement: str
    line: int  # line in Questions.csv


@dataclass(frozen=True)
class VLMPair:
    pair: int  # k: questions 2k-1 and 2k
    pattern: str
    qids: tuple[int, int]
    statements: tuple[str, str]
    images: tuple[Path | None, Path | None]
    lines: tuple[int | None, int | None]
    error: str | None = None  # set: not sent to the server, counts as wrong

    @property
    def texts(self) -> tuple[str, str]:
        return TEXT_PROMPT + self.statements[0], TEXT_PROMPT + self.statements[1]


@dataclass(frozen=True)
class VLMDataset:
    root: Path
    questions_csv: Path
    images_dir: Path
    questions: int
    pairs: tuple[VLMPair, ...]


def find_questions_csv(root: Path) -> Path:
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (expected an MMVP-VLM folder holding {QUESTIONS_CSV} and "
                           f"'{IMAGE_DIRS[0]}/<Type>/<qid>.jpg')")
    return find_csv(root, QUESTIONS_CSV, "the MMVP-VLM questions file with columns "
                    f"{', '.join(aliases[0] for aliases in COLUMN_ALIASES.values())}")


def _pattern_dirs(folder: Path) -> dict[str, list[Path]]:
    """Sub-folders of ``folder`` that name a visual pattern, by pattern."""
    found: dict[str, list[Path]] = {}
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        pattern = pattern_of(child.name)
        if pattern is not None:
            found.setdefault(pattern, []).append(child)
    return found


def find_images_dir(root: Path) -> Path:
    for candidate in [*(root / name for name in IMAGE_DIRS), root]:
        if candidate.is_dir() and _pattern_dirs(candidate):
            return candidate
    raise DatasetError(f"{root}: no image folder; expected '{IMAGE_DIRS[0]}/' (or "
                       f"{', '.join(repr(n + '/') for n in IMAGE_DIRS[1:])}, or {root} itself) holding one folder per "
                       f"visual pattern named by the CSV's Type (e.g. 'Orientation/1.jpg')")


def read_questions(path: Path) -> list[Question]:
    """The rows of Questions.csv; raises DatasetError for a structural problem."""
    reader, header = open_csv(path, ",".join(aliases[0] for aliases in COLUMN_ALIASES.values()))
    keys = [_key(h) for h in header]
    columns: dict[str, int] = {}
    for column, aliases in COLUMN_ALIASES.items():
        for alias in aliases:
            if _key(alias) in keys:
                columns[column] = keys.index(_key(alias))
                break
    missing = [f"{c} ({' / '.join(repr(a) for a in COLUMN_ALIASES[c])})" for c in COLUMN_ALIASES if c not in columns]
    if missing:
        raise DatasetError(f"{path} line {reader.line_num}: missing column(s) {'; '.join(missing)}; header: {header}")
    questions: list[Question] = []
    seen: dict[int, int] = {}
    for cells in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        value = {c: (cells[i].strip() if i < len(cells) else "") for c, i in columns.items()}
        try:
            qid = int(value["qid"])
        except ValueError:
            qid = -1
        if qid < 1:
            raise DatasetError(f"{path} line {line}: {header[columns['qid']].strip()} must be a positive integer, "
                               f"got {value['qid']!r}")
        if qid in seen:
            raise DatasetError(f"{path} line {line}: qid {qid} appears twice (first on line {seen[qid]})")
        seen[qid] = line
        pattern = pattern_of(value["qtype"])
        if pattern is None:
            raise DatasetError(f"{path} line {line} (qid {qid}): {header[columns['qtype']].strip()} "
                               f"{value['qtype']!r} names none of the nine visual patterns ({', '.join(PATTERNS)}; "
                               f"or the released short names such as 'Orientation', 'Camera Perspective')")
        questions.append(Question(qid, value["qtype"], pattern, value["statement"], line))
    if not questions:
        raise DatasetError(f"{path}: no questions below the header")
    return questions


def find_image(images_dir: Path, question: Question, folders: Mapping[str, list[Path]]) -> tuple[Path | None, Path]:
    """(the image of ``question`` or None, the path it was expected at). The folder named exactly
    as the CSV's Type comes first (the official script's path), then the pattern's other folders."""
    expected = images_dir / question.qtype / f"{question.qid}.jpg"
    candidates = [images_dir / question.qtype, *folders.get(question.pattern, [])]
    for folder in dict.fromkeys(candidates):
        for suffix in IMAGE_SUFFIXES:
            path = folder / f"{question.qid}{suffix}"
            if path.is_file():
                return path, expected
    return None, expected


def load_mmvp_vlm(root: Path | str) -> VLMDataset:
    """Read an MMVP-VLM folder into pairs (see the module doc for what is an error and what fails a pair)."""
    root = Path(root)
    csv_path = find_questions_csv(root)
    images_dir = find_images_dir(root)
    questions = read_questions(csv_path)
    folders = _pattern_dirs(images_dir)
    where = lambda q: f"{display_path(csv_path, root)} line {q.line} (qid {q.qid})"  # noqa: E731
    by_qid = {q.qid: q for q in questions}
    pairs = []
    for k in sorted({(q.qid + 1) // 2 for q in questions}):
        first, second = by_qid.get(2 * k - 1), by_qid.get(2 * k)
        present = [q for q in (first, second) if q is not None]
        problems = []
        if first is None or second is None:
            lonely = present[0]
            partner = 2 * k if first is not None else 2 * k - 1
            problems.append(f"{where(lonely)}: its pair partner qid {partner} is not in {display_path(csv_path, root)}")
        elif first.pattern != second.pattern:
            problems.append(f"{where(first)} and line {second.line} (qid {second.qid}): a pair of different visual "
                            f"patterns ({first.qtype!r}, {second.qtype!r})")
        images: list[Path | None] = []
        for q in (first, second):
            if q is None:
                images.append(None)
                continue
            if not q.statement:
                problems.append(f"{where(q)}: empty statement")
            image, expected = find_image(images_dir, q, folders)
            if image is None:
                problems.append(f"{display_path(expected, root)}: image not found (for {where(q)})")
            else:
                _, why = check_image(image)
                if why:
                    problems.append(f"{display_path(image, root)}: {why} (for {where(q)})")
            images.append(image)
        pairs.append(VLMPair(
            pair=k, pattern=present[0].pattern, qids=(2 * k - 1, 2 * k),
            statements=(first.statement if first else "", second.statement if second else ""),
            images=(images[0], images[1]), lines=(first.line if first else None, second.line if second else None),
            error="; ".join(problems) or None))
    return VLMDataset(root, csv_path, images_dir, len(questions), tuple(pairs))
