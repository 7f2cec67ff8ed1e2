"""On-disk cache of per-image embeddings (pooled CLIP, DINOv2 CLS), for ``mofserve mine``.

Layout of the cache folder (``<out>/embeddings/`` by default)::

    meta.json     format version, the model key (profile + encoder versions), the two widths
    clip.npy      float32 [capacity, E] memmap, L2-normalised rows
    dinov2.npy    float32 [capacity, D] memmap, L2-normalised rows
    index.jsonl   one JSON line per stored row: path (absolute), size, mtime_ns, sha256, row
    .lock         held (flock) while a run uses the folder

Rules (each one a unit test in ``tests/unit/test_mining.py``):

- **Model key.** A cache whose key (format version, server profile, image-encoder versions from
  ``server_info()``) differs from the server's is emptied at open: embeddings of another model
  are never mixed in. Only the ``*vision*`` models' versions count (without any, all but the
  language model's ``llava``/``llm``): a new LLM or text tower does not change image embeddings.
  Widths that differ under the same key are an error (delete the folder).
- **File identity.** A path hits when its size and mtime match the index; when only the mtime
  differs (a copy, a ``touch``) the file is read and its SHA-256 compared, and a match is a hit
  (the new mtime is recorded). Anything else is a miss and the file is embedded again (a new
  row; the old one is left unused).
- **Durability / resume.** A batch's rows are written to the memmaps and flushed BEFORE their
  index lines are appended, so an index line always names a complete row; an interrupted run
  leaves at most rows without index lines (reused) and a torn last line (ignored). A rerun
  embeds only what is missing.
- One run at a time per folder (an exclusive ``flock``; a second run fails at once).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
META = "meta.json"
INDEX = "index.jsonl"
CLIP_FILE = "clip.npy"
DINO_FILE = "dinov2.npy"
LOCK = ".lock"
_LM_VERSION_KEYS = ("llava", "llm")  # versions that do not change image embeddings
_COPY_ROWS = 1 << 16


class CacheLockedError(RuntimeError):
    """Another process holds the cache folder."""


@dataclass(frozen=True)
class FileStamp:
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Entry:
    row: int
    size: int
    mtime_ns: int
    sha256: str


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_key(profile: str, model_versions: Mapping[str, str], random_weights: bool) -> dict[str, Any]:
    """What must match for cached embeddings to be reused: the profile and the versions of the
    image encoders (the ``*vision*`` models when the server names any, else every model but the
    language model), so that a new LLM or text tower keeps the cache."""
    items = sorted((str(k), str(v)) for k, v in model_versions.items())
    vision = [(k, v) for k, v in items if "vision" in k.lower()]
    versions = dict(vision or [(k, v) for k, v in items if k.lower() not in _LM_VERSION_KEYS])
    return {"profile": profile, "random_weights": bool(random_weights), "model_versions": versions}


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (computed in float64, returned float32); a zero row stays zero."""
    x64 = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x64, axis=1, keepdims=True)
    return (x64 / np.maximum(norms, 1e-12)).astype(np.float32)


class EmbeddingCache:
    """Open (creating or emptying as the rules say) the cache at ``directory`` for ``key``."""

    def __init__(self, directory: Path, key: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = dict(key)
        self._lock_file = open(self.directory / LOCK, "a+")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise CacheLockedError(f"{self.directory}: in use by another mofserve mine run") from None
        self.invalidated: str | None = None  # why an existing cache was emptied at open
        self.entries: dict[str, Entry] = {}
        self.count = 0  # rows in use (all index lines, superseded ones included)
        self.clip_dim: int | None = None
        self.dino_dim: int | None = None
        self.clip: np.ndarray | None = None
        self.dino: np.ndarray | None = None
        self._wanted = 0  # capacity asked for by reserve() before the arrays exist
        self._open()

    # ---- open / invalidate -------------------------------------------------------------------

    def _meta(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.directory / META).read_text())
        except (OSError, ValueError):
            return None

    def _open(self) -> None:
        meta = self._meta()
        files = [self.directory / n for n in (META, INDEX, CLIP_FILE, DINO_FILE)]
        if meta is None:
            if any(f.exists() for f in files):
                self._wipe("no readable meta.json")
            return
        if meta.get("format") != FORMAT_VERSION:
            self._wipe(f"format {meta.get('format')} != {FORMAT_VERSION}")
            return
        if meta.get("key") != self.key:
            self._wipe(f"model changed: cached {json.dumps(meta.get('key'), sort_keys=True)}, "
                       f"server {json.dumps(self.key, sort_keys=True)}")
            return
        try:
            self.clip = np.load(self.directory / CLIP_FILE, mmap_mode="r+")
            self.dino = np.load(self.directory / DINO_FILE, mmap_mode="r+")
        except (OSError, ValueError) as error:
            self._wipe(f"unreadable arrays ({error})")
            return
        self.clip_dim, self.dino_dim = int(meta["clip_dim"]), int(meta["dino_dim"])
        if self.clip.shape[1:] != (self.clip_dim,) or self.dino.shape[1:] != (self.dino_dim,) \
                or self.clip.shape[0] != self.dino.shape[0]:
            self._wipe("array shapes disagree with meta.json")
            return
        self._read_index()

    def _read_index(self) -> None:
        capacity = self.capacity
        try:
            lines = (self.directory / INDEX).read_text().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                item = json.loads(line)
                entry = Entry(int(item["row"]), int(item["size"]), int(item["mtime_ns"]), str(item["sha256"]))
                path = str(item["path"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line of an interrupted run
            if not 0 <= entry.row < capacity:
                continue
            self.entries[path] = entry  # a later line supersedes an earlier one
            self.count = max(self.count, entry.row + 1)

    def _wipe(self, reason: str) -> None:
        self.close_arrays()
        for name in (META, INDEX, CLIP_FILE, DINO_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()
        self.invalidated = reason
        self.entries, self.count = {}, 0
        self.clip_dim = self.dino_dim = None

    # ---- queries -----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return 0 if self.clip is None else int(self.clip.shape[0])

    def lookup(self, path: Path, stamp: FileStamp, read: Callable[[], bytes]) -> int | None:
        """The row of ``path`` (absolute) if its embedding is cached and still current, else None.
        ``read`` gives the file's bytes; it is called only when the size matches but the mtime
        does not, to compare content hashes."""
        entry = self.entries.get(str(path))
        if entry is None or entry.size != stamp.size:
            return None
        if entry.mtime_ns == stamp.mtime_ns:
            return entry.row
        if sha256(read()) != entry.sha256:
            return None
        self._append_index([(str(path), Entry(entry.row, stamp.size, stamp.mtime_ns, entry.sha256))])
        return entry.row

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CLIP and DINOv2 embeddings of ``rows``, read into memory (float32)."""
        if self.clip is None or self.dino is None:
            return np.zeros((0, self.clip_dim or 0), np.float32), np.zeros((0, self.dino_dim or 0), np.float32)
        return np.asarray(self.clip[rows]), np.asarray(self.dino[rows])

    # ---- writes ------------------------------------------------------------------------------

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more rows now (files are created at the first ``put`` if none exist)."""
        self._wanted = self.count + n
        if self.clip is not None and self._wanted > self.capacity:
            self._grow(self._wanted)

    def put(self, items: Sequence[tuple[Path, FileStamp, str]], clip: np.ndarray, dino: np.ndarray) -> list[int]:
        """Store L2-normalised rows for ``items`` (absolute path, stamp, sha256); returns their rows."""
        n = len(items)
        if clip.shape[0] != n or dino.shape[0] != n:
            raise ValueError(f"put: {n} items but {clip.shape[0]} CLIP and {dino.shape[0]} DINOv2 rows")
        if self.clip is None:
            self._create(clip.shape[1], dino.shape[1], max(self._wanted, self.count + n))
        if (clip.shape[1], dino.shape[1]) != (self.clip_dim, self.dino_dim):
            raise ValueError(f"{self.directory}: cached widths (CLIP {self.clip_dim}, DINOv2 {self.dino_dim}) differ "
                             f"from the server's ({clip.shape[1]}, {dino.shape[1]}) for the same model versions; "
                             "delete the folder")
        if self.count + n > self.capacity:
            self._grow(max(self.count + n, 2 * self.capacity))
        assert self.clip is not None and self.dino is not None
        start = self.count
        self.clip[start:start + n] = l2_normalise(clip)
        self.dino[start:start + n] = l2_normalise(dino)
        self.clip.flush()
        self.dino.flush()
        self.count += n
        self._append_index([(str(p), Entry(start + k, s.size, s.mtime_ns, digest))
                            for k, (p, s, digest) in enumerate(items)])
        return list(range(start, start + n))

    def _append_index(self, lines: Sequence[tuple[str, Entry]]) -> None:
        text = "".join(json.dumps({"path": p, "size": e.size, "mtime_ns": e.mtime_ns, "sha256": e.sha256,
                                   "row": e.row}) + "\n" for p, e in lines)
        with open(self.directory / INDEX, "a") as f:
            f.write(text)
            f.flush()
        for p, e in lines:
            self.entries[p] = e

    def _create(self, clip_dim: int, dino_dim: int, capacity: int) -> None:
        self.clip_dim, self.dino_dim = int(clip_dim), int(dino_dim)
        capacity = max(capacity, 1)
        self.clip = np.lib.format.open_memmap(self.directory / CLIP_FILE, "w+", np.float32, (capacity, clip_dim))
        self.dino = np.lib.format.open_memmap(self.directory / DINO_FILE, "w+", np.float32, (capacity, dino_dim))
        (self.directory / INDEX).write_text("")
        tmp = self.directory / (META + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT_VERSION, "key": self.key, "clip_dim": self.clip_dim,
                                   "dino_dim": self.dino_dim}, indent=1, sort_keys=True))
        os.replace(tmp, self.directory / META)

    def _grow(self, capacity: int) -> None:
        """Copy both arrays into larger files (chunked, so memory stays small) and swap them in."""
        assert self.clip is not None and self.dino is not None
        for name, attr in ((CLIP_FILE, "clip"), (DINO_FILE, "dino")):
            old = getattr(self, attr)
            tmp = self.directory / (name + ".tmp")
            new = np.lib.format.open_memmap(tmp, "w+", np.float32, (capacity, old.shape[1]))
            for s in range(0, self.count, _COPY_ROWS):
                new[s:min(self.count, s + _COPY_ROWS)] = old[s:min(self.count, s + _COPY_ROWS)]
            new.flush()
            del new
            setattr(self, attr, None)
            del old
            os.replace(tmp, self.directory / name)
            setattr(self, attr, np.load(self.directory / name, mmap_mode="r+"))

    # ---- lifetime ----------------------------------------------------------------------------

    def close_arrays(self) -> None:
        for attr in ("clip", "dino"):
            arr = getattr(self, attr)
            if arr is not None and hasattr(arr, "flush"):
                arr.flush()
            setattr(self, attr, None)

    def close(self) -> None:
        self.close_arrays()
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.directory.iterdir() if f.is_file())
