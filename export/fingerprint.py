"""Cache keys for exports: a digest of the source checkpoint, the settings and the exporter.

Weight files are hashed by content (a renamed or re-saved checkpoint with the same bytes
reuses its export); a memo keyed by (path, size, mtime) avoids re-reading gigabytes on every
``mofserve export``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_CHUNK = 8 << 20


def file_digest(path: Path, memo: dict[str, str] | None = None) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if memo is not None and key in memo:
        return memo[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        memo[key] = digest
    return digest


def folder_digest(folder: Path, memo_file: Path | None = None) -> str:
    """Digest of a checkpoint folder: configs and weights, not READMEs or markers."""
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except json.JSONDecodeError:
            memo = {}
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix not in {".json", ".safetensors", ".bin", ".pt", ".pth"} or path.name.startswith("."):
            continue
        h.update(str(path.relative_to(folder)).encode())
        h.update(file_digest(path, memo).encode())
    if memo_file is not None:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_file)
    return h.hexdigest()


def settings_digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
