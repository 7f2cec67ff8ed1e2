"""The one report writer of the evaluators and the benchmarks: a timestamped results folder,
atomic JSON / CSV / text writes, strict JSON (NaN and inf as null, numpy scalars and paths as
their values) and Markdown tables.

Atomic (a temporary file, then ``os.replace``) because reports are read by scripts and by people
while long runs are still going, and a run killed half-way must not leave a torn report.json.
Strict JSON because a NaN (a ratio with no denominator on an idle phase) is not JSON, and a
report that ``json.loads`` accepts but a browser or ``jq`` refuses is a trap.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np


def timestamped_dir(prefix: str, base: Path | str = "results") -> Path:
    """``results/<prefix>-YYYYmmdd-HHMMSS`` (not created)."""
    return Path(base) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def write_text(path: Path | str, text: str) -> None:
    _atomic_write(Path(path), text)


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON data, recursively: NaN / inf floats as None, numpy scalars and
    arrays as Python numbers and lists, paths (and keys JSON has no form for) as strings."""
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):  # keys JSON cannot hold (tuples, paths) as their str
        return {k if k is None or isinstance(k, str | int | float | bool) else str(k): json_safe(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def json_text(data: Any, indent: int = 2) -> str:
    """Strict JSON; an object JSON has no form for (a dtype, a device) is written as its ``str``:
    a report at the end of a long run is worth more than a TypeError."""
    return json.dumps(json_safe(data), indent=indent, ensure_ascii=False, allow_nan=False, default=str) + "\n"


def write_json(path: Path | str, data: Any, indent: int = 2) -> None:
    _atomic_write(Path(path), json_text(data, indent))


def csv_cell(value: Any) -> str:
    """True/False -> 1/0, None -> empty, floats compact; the rest as str."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return str(value)


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_cell(row.get(c)) for c in columns])
    _atomic_write(path, buffer.getvalue())


def _md_cell(value: Any) -> str:
    return ("-" if value is None or value == "" else str(value)).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub table; ``align`` is one character per column, "l" or "r" (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def number(value: float | None, digits: int = 1, suffix: str = "") -> str:
    """A table cell: ``value`` to ``digits`` decimals and ``suffix``; "-" when there is no value
    (None, or NaN / inf: a ratio without a denominator, a phase that did not run)."""
    if value is None or (isinstance(value, float | np.floating) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def times(value: float | None, digits: int = 2) -> str:
    """A ratio cell: "1.23x"; "-" when there is no value."""
    return number(value, digits, "x")
