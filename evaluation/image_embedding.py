"""The input side of ``mofserve mine``: which image files to use, and their embeddings from the
server's ``Embed`` RPC written into the embedding cache.

Each file is read and checked with the server's own decoder before it is sent, so that one bad
image never fails a batch; batches are cut to the server's message size, and an image the server
still refuses is isolated by halving its batch. Every image that cannot be used becomes a
``Failure`` (``failed.csv``). ``mining.py`` runs it and reads the cache afterwards.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from mofserve.clients.client import MofServeError
from mofserve.core.preprocessing import ImageError, ImageLimits, decode_image

from .embedding_cache import EmbeddingCache, FileStamp, sha256
from .progress import progress_bar

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# ---- input ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    display: str  # the path as the user gave it (folder / relative path, or the list file's line)
    path: Path  # absolute; the cache key


@dataclass(frozen=True)
class Failure:
    path: str
    stage: str  # list | read | decode | server
    reason: str


def collect_images(source: Path) -> tuple[list[ImageRef], list[Failure]]:
    """Images of a folder (recursive, by suffix, sorted) or of a list file (one path a line;
    blank lines and ``#`` comments skipped; relative paths are relative to the list's folder).
    A list's missing, non-file or repeated entries come back as failures. Raises
    ``FileNotFoundError`` for a missing source and ``ValueError`` when it names no image."""
    source = Path(source)
    if source.is_dir():
        found = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise ValueError(f"images: no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}) under {source}")
        return [ImageRef(str(p), Path(os.path.abspath(p))) for p in found], []
    if not source.exists():
        raise FileNotFoundError(f"images: {source}: no such folder or list file")
    refs: list[ImageRef] = []
    failures: list[Failure] = []
    seen: dict[str, int] = {}
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"images: cannot read the list file {source} ({error})") from None
    for number, line in enumerate(lines, 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        path = Path(name).expanduser()
        absolute = Path(os.path.abspath(path if path.is_absolute() else source.parent / path))
        if str(absolute) in seen:
            failures.append(Failure(name, "list", f"duplicate of line {seen[str(absolute)]} of {source}"))
        elif not absolute.exists():
            failures.append(Failure(name, "list", f"missing: no such file (line {number} of {source})"))
        elif not absolute.is_file():
            failures.append(Failure(name, "list", f"not a file (line {number} of {source})"))
        else:
            seen[str(absolute)] = number
            refs.append(ImageRef(name, absolute))
    if not refs and not failures:
        raise ValueError(f"images: the list file {source} names no image")
    return refs, failures


# ---- embedding through the server ----------------------------------------------------------------


@dataclass
class _Prepared:
    ref: ImageRef
    data: bytes
    stamp: FileStamp
    digest: str


@dataclass
class EmbedStats:
    listed: int = 0  # usable entries of the input
    cached: int = 0  # found in the cache
    embedded: int = 0  # embedded by this run
    embed_calls: int = 0  # Embed RPCs sent (isolating a refused image counts each retry)
    embed_seconds: float = 0.0  # wall time of the embedding phase (reading + checking + RPCs)
    failed: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # absolute path -> cache row, for this run's images


def _prepare(ref: ImageRef, max_bytes: int) -> _Prepared | Failure:
    """Read the file and check it with the server's decoder, so that a bad image never fails a batch."""
    try:
        stamp = FileStamp.of(ref.path)
        data = ref.path.read_bytes()
    except OSError as error:
        return Failure(ref.display, "read", f"{type(error).__name__}: {error.strerror or error}")
    if len(data) > max_bytes:
        return Failure(ref.display, "decode",
                       f"{len(data)} bytes exceeds the server's limit of {max_bytes} bytes (max_image_bytes)")
    try:
        decode_image(data, ImageLimits(max_bytes=max_bytes))
    except ImageError as error:
        return Failure(ref.display, "decode", str(error))
    return _Prepared(ref, data, stamp, sha256(data))


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for s in range(0, len(items), size):
        yield items[s:s + size]


def _by_bytes(items: Sequence[_Prepared], budget: int) -> Iterator[list[_Prepared]]:
    """Split a batch so that each Embed message stays under the server's message size limit."""
    group: list[_Prepared] = []
    size = 0
    for item in items:
        cost = len(item.data) + 64
        if group and size + cost > budget:
            yield group
            group, size = [], 0
        group.append(item)
        size += cost
    if group:
        yield group


async def embed_images(todo: Sequence[ImageRef], cache: EmbeddingCache, client, limits: dict[str, int], *, batch: int,
                 concurrency: int, timeout: float | None, failures: list[Failure], stats: EmbedStats,
                 progress: bool) -> None:
    isolate = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    max_bytes = int(limits.get("max_image_bytes") or 20 << 20)
    budget = int(limits.get("max_message_bytes") or max_bytes + (1 << 20)) - (1 << 16)
    batch = max(1, min(batch, int(limits.get("max_embed_images") or batch)))
    gate = asyncio.Semaphore(concurrency)
    in_flight: set[asyncio.Task] = set()
    fatal: list[BaseException] = []
    bar = progress_bar(total=len(todo), desc="embed", unit="img", enabled=progress)

    async def embed(items: list[_Prepared]) -> None:
        stats.embed_calls += 1
        try:
            result = await client.embed([it.data for it in items], timeout=timeout)
        except MofServeError as error:
            if error.code not in isolate:
                raise
            if len(items) == 1:  # this image is the one the server refuses
                failures.append(Failure(items[0].ref.display, "server", f"{error.code.name}: {error.message}"))
                bar.update(1)
                return
            half = len(items) // 2  # find the refused image(s); the others are embedded again
            await embed(items[:half])
            await embed(items[half:])
            return
        if result.clip.shape[0] != len(items) or result.dinov2.shape[0] != len(items):
            raise RuntimeError(f"Embed: sent {len(items)} images, got {result.clip.shape[0]} CLIP and "
                               f"{result.dinov2.shape[0]} DINOv2 embeddings")
        finite = np.isfinite(result.clip).all(axis=1) & np.isfinite(result.dinov2).all(axis=1)
        for k in np.flatnonzero(~finite):
            failures.append(Failure(items[k].ref.display, "server", "non-finite embedding"))
        good = [it for it, ok in zip(items, finite, strict=True) if ok]
        if good:
            rows = cache.put([(it.ref.path, it.stamp, it.digest) for it in good], result.clip[finite],
                             result.dinov2[finite])
            stats.rows.update(zip((str(it.ref.path) for it in good), rows, strict=True))
        stats.embedded += len(good)
        bar.update(len(items))

    async def send(items: list[_Prepared]) -> None:
        try:
            await embed(items)
        except BaseException as error:  # re-raised once the calls in flight finish
            fatal.append(error)
        finally:
            gate.release()

    try:
        for chunk in _chunks(todo, batch):
            if fatal:
                break
            prepared = await asyncio.to_thread(lambda c=chunk: [_prepare(r, max_bytes) for r in c])
            bad = [p for p in prepared if isinstance(p, Failure)]
            failures.extend(bad)
            bar.update(len(bad))
            for group in _by_bytes([p for p in prepared if isinstance(p, _Prepared)], budget):
                await gate.acquire()
                if fatal:
                    gate.release()
                    break
                task = asyncio.create_task(send(group))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)
    finally:
        bar.close()
    if fatal:
        raise fatal[0]
