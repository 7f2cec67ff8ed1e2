"""Reading the MMVP benchmark folder as the official release lays it out.

    DIR/MMVP Images/1.jpg ... 300.jpg      (also accepted: MMVP_Images/, images/, and the official
                                            script's own misspelling "MMVP Imgaes/")
    DIR/Questions.csv                      Index,Question,Options,Correct Answer
                                           (the official file spells the first column "lndex")

The row whose Index is k asks about image ``k.jpg`` (in the official file Index k is also the k-th
row, so this is the official script's ``photo_id = row + 1``). Rows 2p-1 and 2p (by Index) form
pair p.

Problems with the folder or the CSV's structure (no images folder, no CSV, an unknown header, a
missing column, an Index that is not a positive integer or appears twice) raise ``DatasetError``
naming the file (and line). Problems of one item (options that do not parse, a Correct Answer that
names no option, an empty cell, a missing or unreadable image) do not stop the run: the item keeps
an ``error`` naming the file and row, is never sent to the server, and counts as failed.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mofserve.core.conversation import answer_to_letter, parse_options

IMAGE_DIRS = ("MMVP Images", "MMVP_Images", "MMVP Imgaes", "images")
QUESTIONS_CSV = "Questions.csv"
INDEX_HEADERS = ("Index", "lndex")  # "lndex" (lower-case L) is a real typo of the official file
COLUMNS = ("Question", "Options", "Correct Answer")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# Known label errors of the official Questions.csv (tsb0601/MMVP issue #30, lmms-eval issue #1018):
# within pairs 99/100 (elephant tusks) and 279/280 (elderly person standing / sitting) the two
# Correct Answers are the wrong way round. The fix swaps the Correct Answer values of the two rows of
# each pair; on the official file that is 99 (a)->(b), 100 (b)->(a), 279 (a)->(b), 280 (b)->(a), the
# labels of lmms-eval's corrected dataset (lmms-lab-eval/MMVP).
LABEL_FIX_PAIRS = ((99, 100), (279, 280))


class DatasetError(ValueError):
    """The benchmark folder or its CSV cannot be read as MMVP (names the file, and the line)."""


@dataclass(frozen=True)
class MMVPItem:
    index: int  # the CSV's Index; the image is <index>.jpg
    question: str
    options: str  # as in the CSV: "(a) Standing (b) Sitting"
    correct: str  # the CSV's Correct Answer as written: "(a)"
    correct_letter: str | None  # "a"; None when the item has an error
    image: Path | None  # None when missing
    line: int  # line of the row in Questions.csv (for messages)
    image_sha256: str = ""
    error: str | None = None  # set: the item is not asked and counts as failed

    @property
    def pair(self) -> int:
        """Pair p holds Index 2p-1 and 2p."""
        return (self.index + 1) // 2

    @property
    def prompt(self) -> str:
        """The official script's prompt text: ``Question + " " + Options``."""
        return self.question + " " + self.options


@dataclass(frozen=True)
class LabelFixes:
    """What ``--fix-labels`` changed: ``changes`` (index, from, to) and the pairs it could not fix."""

    changes: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MMVPDataset:
    root: Path
    questions_csv: Path
    images_dir: Path
    items: tuple[MMVPItem, ...]  # in file order, after --limit
    rows: int  # rows in the CSV (before --limit)
    correct_by_index: dict[int, str]  # every row's Correct Answer (the label fixes need the partner's)

    def label_fixed(self) -> tuple[tuple[MMVPItem, ...], LabelFixes]:
        return apply_label_fixes(self.items, self.correct_by_index)


def display_path(path: Path, root: Path) -> str:
    """``path`` relative to the dataset root when it lies inside it (for messages and reports)."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def find_images_dir(root: Path) -> Path:
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (expected an MMVP folder holding 'MMVP Images/' and "
                           f"{QUESTIONS_CSV})")
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    raise DatasetError(f"{root}: no images folder; expected {IMAGE_DIRS[0]!r} (or "
                       f"{', '.join(repr(n) for n in IMAGE_DIRS[1:])}) holding 1.jpg, 2.jpg, ...")


def find_csv(root: Path, name: str, expected: str) -> Path:
    """``root/name``, or a CSV in ``root`` whose name matches it but for case (datasets copied
    from Windows or re-zipped come as questions.csv); ``expected`` says what the file should be."""
    path = root / name
    if path.is_file():
        return path
    for candidate in sorted(root.glob("*.csv")):
        if candidate.name.lower() == name.lower():
            return candidate
    raise DatasetError(f"{path}: not found (expected {expected})")


def find_questions_csv(root: Path) -> Path:
    return find_csv(root, QUESTIONS_CSV, f"the MMVP questions file with columns Index, {', '.join(COLUMNS)}")


def _norm(name: str | None) -> str:
    return " ".join((name or "").split()).lower()


@dataclass(frozen=True)
class _Row:
    index: int
    line: int
    question: str
    options: str
    correct: str
    problem: str | None


def open_csv(path: Path, expected_header: str):
    """A CSV reader positioned after the header (blank lines before it skipped), and the header;
    an unreadable, non-UTF-8 or empty file is a DatasetError naming ``path``."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror or error})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    while header is not None and not any(cell.strip() for cell in header):
        header = next(reader, None)
    if header is None:
        raise DatasetError(f"{path}: empty file; expected a header {expected_header}")
    return reader, header


def read_questions(path: Path) -> list[_Row]:
    """The rows of Questions.csv; raises DatasetError for a structural problem."""
    reader, header = open_csv(path, f"Index,{','.join(COLUMNS)}")
    names = [_norm(h) for h in header]
    if names[0] not in {_norm(h) for h in INDEX_HEADERS}:
        raise DatasetError(f"{path} line {reader.line_num}: unknown header: the first column must be 'Index' "
                           f"(or the official file's typo 'lndex'), got {header[0].strip()!r}; header: {header}")
    columns = {}
    missing = []
    for wanted in COLUMNS:
        if _norm(wanted) in names:
            columns[wanted] = names.index(_norm(wanted))
        else:
            missing.append(wanted)
    if missing:
        raise DatasetError(f"{path} line {reader.line_num}: missing column(s) {', '.join(map(repr, missing))}; "
                           f"header: {header}")
    rows: list[_Row] = []
    seen: dict[int, int] = {}
    for cells in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        raw_index = cells[0].strip()
        try:
            index = int(raw_index)
        except ValueError:
            index = -1
        if index < 1:
            raise DatasetError(f"{path} line {line}: Index must be a positive integer, got {raw_index!r}")
        if index in seen:
            raise DatasetError(f"{path} line {line}: Index {index} appears twice (first on line {seen[index]})")
        seen[index] = line
        values = {name: (cells[i].strip() if i < len(cells) else None) for name, i in columns.items()}
        problems = [f"missing value for {name!r}" for name, value in values.items() if value is None]
        problems += [f"{name!r} is empty" for name, value in values.items() if value == ""]
        if len(cells) > len(header):
            problems.append(f"{len(cells)} fields but the header has {len(header)} (an unquoted comma?)")
        rows.append(_Row(index, line, values["Question"] or "", values["Options"] or "", values["Correct Answer"] or "",
                         "; ".join(problems) or None))
    if not rows:
        raise DatasetError(f"{path}: no questions below the header")
    return rows


def find_image(images_dir: Path, index: int) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = images_dir / f"{index}{suffix}"
        if path.is_file():
            return path
    return None


def check_image(path: Path) -> tuple[str, str | None]:
    """(sha256 of the file, None) or ("", why it cannot be used). Decodes the whole image."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return "", f"cannot read ({error.strerror or error})"
    if not data:
        return "", "empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except UnidentifiedImageError:
        return "", "cannot decode the image (not an image format Pillow reads)"
    except Exception as error:  # Pillow raises several types for a damaged file
        return "", f"cannot decode the image ({type(error).__name__}: {error})"
    return hashlib.sha256(data).hexdigest(), None


def correct_letter(correct: str, options: str) -> tuple[str | None, str | None]:
    """(letter, None) or (None, why): the Correct Answer mapped with the grading rule itself."""
    try:
        parsed = parse_options(options)
    except ValueError as error:
        return None, str(error)
    letter = answer_to_letter(correct, parsed)
    if letter is None:
        return None, f"Correct Answer {correct!r} names none of the options {options!r}"
    return letter, None


def _item(row: _Row, csv_path: Path, images_dir: Path, root: Path) -> MMVPItem:
    where = f"{display_path(csv_path, root)} line {row.line} (Index {row.index})"
    error = f"{where}: {row.problem}" if row.problem else None
    letter = None
    if error is None:
        letter, why = correct_letter(row.correct, row.options)
        if why:
            error = f"{where}: {why}"
    image = find_image(images_dir, row.index)
    digest = ""
    if image is None:
        problem = f"{display_path(images_dir / f'{row.index}.jpg', root)}: image not found (for {where})"
        error = f"{error}; {problem}" if error else problem
    else:
        digest, why = check_image(image)
        if why:
            problem = f"{display_path(image, root)}: {why} (for {where})"
            error = f"{error}; {problem}" if error else problem
    return MMVPItem(row.index, row.question, row.options, row.correct, None if error else letter, image, row.line,
                    digest, error)


def load_mmvp(root: Path | str, limit: int | None = None) -> MMVPDataset:
    """Read an MMVP folder; ``limit`` keeps the first rows of the file (all rows are read so that
    the label fixes can see a row's partner)."""
    root = Path(root)
    images_dir = find_images_dir(root)
    csv_path = find_questions_csv(root)
    rows = read_questions(csv_path)
    kept = rows if limit is None else rows[:limit]
    items = tuple(_item(row, csv_path, images_dir, root) for row in kept)
    return MMVPDataset(root, csv_path, images_dir, items, len(rows), {r.index: r.correct for r in rows})


def apply_label_fixes(items: Sequence[MMVPItem], correct_by_index: dict[int, str],
                      pairs: Sequence[tuple[int, int]] = LABEL_FIX_PAIRS) -> tuple[tuple[MMVPItem, ...], LabelFixes]:
    """Swap the Correct Answer of the two rows of each pair in ``pairs`` (see LABEL_FIX_PAIRS).

    Returns the items with fixed labels (letters recomputed against each row's own options) and
    what changed; a pair with a row missing from the CSV is skipped and said so.
    """
    swapped: dict[int, str] = {}
    fixes = LabelFixes()
    for first, second in pairs:
        absent = [i for i in (first, second) if i not in correct_by_index]
        if absent:
            fixes.skipped.append(f"{first}/{second}: Index {', '.join(map(str, absent))} not in the CSV")
            continue
        swapped[first], swapped[second] = correct_by_index[second], correct_by_index[first]
    fixed = []
    for item in items:
        if item.index not in swapped:
            fixed.append(item)
            continue
        new = swapped[item.index]
        fixes.changes.append({"index": item.index, "from": item.correct, "to": new})
        if item.error:
            fixed.append(replace(item, correct=new))
            continue
        letter, why = correct_letter(new, item.options)
        fixed.append(replace(item, correct=new, correct_letter=letter,
                             error=f"Questions.csv line {item.line} (Index {item.index}): fixed label: {why}"
                             if why else None))
    return tuple(fixed), fixes
