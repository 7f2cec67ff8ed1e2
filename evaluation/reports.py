"""Outputs shared by the evaluators: a timestamped results folder, machine information, atomic
JSON / CSV / text writes, Markdown tables and an append-only JSON-lines checkpoint.

A checkpoint (``answers.jsonl``) gets one line per finished request, flushed as it arrives, so a
run that stops (Ctrl-C, a crash, a lost server) keeps everything answered so far; ``load`` reads
it back for a rerun with the same output folder, tolerating the torn last line a kill can leave.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any


def timestamped_dir(prefix: str, base: Path | str = "results") -> Path:
    """``results/<prefix>-YYYYmmdd-HHMMSS`` (not created)."""
    return Path(base) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def machine_info() -> dict[str, Any]:
    try:
        version = metadata.version("mofserve")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "mofserve": version}


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    _atomic_write(path, text)


def write_json(path: Path, data: Any) -> None:
    _atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


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


def pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class JsonlCheckpoint:
    """Append-only JSON lines; ``append`` flushes each record."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = None
        self.bad_lines: list[int] = []

    def load(self) -> list[dict[str, Any]]:
        """Every record of the file (none if it does not exist). A line that is not a JSON object
        (the torn end of a killed run) is skipped and its number kept in ``bad_lines``."""
        self.bad_lines = []
        if not self.path.exists():
            return []
        records = []
        with self.path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    self.bad_lines.append(number)
                    continue
                if isinstance(record, dict):
                    records.append(record)
                else:
                    self.bad_lines.append(number)
        return records

    def append(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = self.path.exists() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
            self._file = self.path.open("a", encoding="utf-8")
            if torn:  # a killed run left half a line: start on a fresh one
                self._file.write("\n")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
