"""An append-only JSON-lines checkpoint for the evaluators.

A checkpoint (``answers.jsonl``) gets one line per finished request, flushed as it arrives, so a
run that stops (Ctrl-C, a crash, a lost server) keeps everything answered so far; ``load`` reads
it back for a rerun with the same output folder, tolerating the torn last line a kill can leave.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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
