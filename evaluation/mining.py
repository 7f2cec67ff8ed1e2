"""``mofserve mine``: find CLIP-blind pairs in an image collection through a running server.

A CLIP-blind pair (Tong et al., "Eyes Wide Shut?", CVPR 2024) is two images whose pooled CLIP
embeddings are almost the same (cosine > 0.95) while DINOv2 sees them as different (CLS cosine
< 0.6). The miner:

1. lists the images (a folder, recursively, or a text file of paths) and reports every one it
   cannot use in ``failed.csv`` (missing, unreadable, not decodable, refused by the server);
2. embeds the rest with both encoders through the gRPC client (``Embed``: pooled CLIP image
   embedding and DINOv2 CLS), ``--batch`` images per call and ``--concurrency`` calls in flight,
   L2-normalised into an on-disk cache (``embedding_cache.py``) so that a rerun with other
   thresholds embeds nothing and an interrupted run resumes;
3. searches all pairs blockwise (memory bounded by ``--block``): for each tile of the upper
   triangle of the CLIP similarity matrix, candidates above the CLIP threshold come from FAISS
   (``IndexFlatIP.range_search``) or numpy; only those are scored exactly (float64) in both
   encoders and kept when CLIP cos > t_clip and DINOv2 cos < t_dino (both strict);
4. writes ``pairs.csv`` (sorted by the CLIP - DINOv2 gap, largest first), ``failed.csv``,
   ``summary.json`` and ``contact_sheet.png`` (the top pairs side by side with their scores).

It talks to the server only through ``mofserve.clients`` and uses ``mofserve.core`` to check
images with the server's own decoder before sending them; it never imports the server.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from mofserve.clients import AsyncMofServeClient
from mofserve.clients.client import DEFAULT_TARGET, MofServeError
from mofserve.core.preprocessing import ImageError, ImageLimits, decode_image
from mofserve.core.reports import write_json

from .embedding_cache import CacheLockedError, EmbeddingCache, FileStamp, model_key, sha256

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_CLIP_THRESHOLD = 0.95
DEFAULT_DINO_THRESHOLD = 0.6
DEFAULT_OUT = Path("results/mine")
BACKENDS = ("auto", "faiss", "numpy")
# Candidates come from float32 products (BLAS/FAISS), whose rounding is ~1e-6 at these widths;
# they are fetched this far below the threshold and then scored exactly, so that a pair's fate
# never depends on the backend, the block size or the tile it fell in.
CANDIDATE_MARGIN = 1e-3
_PRUNE_SLACK = 1 << 16  # kept pairs beyond 2 x max_pairs before the buffer is cut back to max_pairs
_SCORE_ELEMENTS = 1 << 22  # float64 elements per chunk when scoring candidates (32 MiB per operand)
RANDOM_WEIGHTS_NOTE = ("the server runs seeded random weights (profile {profile}): its embeddings, and so these "
                       "pairs, are not meaningful; serve --profile paper to mine real CLIP-blind pairs")
SHEET_NOTE = "seeded random weights (profile {profile}): these pairs are not meaningful"


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


# ---- the blockwise all-pairs search --------------------------------------------------------------


@dataclass
class SearchResult:
    i: np.ndarray  # int64 row of the first image (i < j)
    j: np.ndarray
    clip: np.ndarray  # float64 cosines
    dino: np.ndarray
    candidates: int  # pairs with CLIP cosine > the CLIP threshold
    found: int  # of those, pairs with DINOv2 cosine < the DINOv2 threshold (may exceed len(i) if capped)
    truncated: bool  # found > max_pairs: only the max_pairs largest gaps are kept
    backend: str
    block: int
    tiles: int
    seconds: float

    @property
    def gap(self) -> np.ndarray:
        return self.clip - self.dino


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "faiss" if _faiss() is not None else "numpy"
    if backend == "faiss" and _faiss() is None:
        raise ValueError("backend: faiss is not installed (pip install faiss-cpu), use --backend numpy")
    return backend


def _row_norms(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[0], np.float64)
    step = max(1, _SCORE_ELEMENTS // max(1, x.shape[1]))
    for s in range(0, x.shape[0], step):
        out[s:s + step] = np.linalg.norm(x[s:s + step].astype(np.float64), axis=1)
    return np.maximum(out, 1e-300)


def exact_cosines(x: np.ndarray, norms: np.ndarray, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
    """Cosine of rows ``ii[k]`` and ``jj[k]`` of ``x`` in float64, chunked. Each value depends on
    its two rows only, so it is the same whichever tile or batch the pair came from."""
    out = np.empty(len(ii), np.float64)
    step = max(1, _SCORE_ELEMENTS // max(1, x.shape[1]))
    for s in range(0, len(ii), step):
        a, b = ii[s:s + step], jj[s:s + step]
        out[s:s + step] = np.einsum("ij,ij->i", x[a], x[b], dtype=np.float64) / (norms[a] * norms[b])
    return out


def _tiles(n: int, block: int) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """Column blocks of the upper triangle, each with the row blocks at or above the diagonal."""
    for c0 in range(0, n, block):
        yield c0, min(n, c0 + block), [(r0, min(n, r0 + block)) for r0 in range(0, c0 + 1, block)]


def _top(i, j, c, d, k: int) -> tuple[np.ndarray, ...]:
    """The ``k`` pairs with the largest gap, sorted; ties by (i, j), so the choice is a total order.
    A partition first, so that a large buffer is never fully sorted."""
    if k <= 0:
        return i[:0], j[:0], c[:0], d[:0]
    if len(i) > k:
        neg_gap = d - c
        kth = np.partition(neg_gap, k - 1)[k - 1]
        sel = np.flatnonzero(neg_gap <= kth)  # the k largest gaps and every tie of the k-th
        i, j, c, d = i[sel], j[sel], c[sel], d[sel]
    order = np.lexsort((j, i, d - c))[:k]
    return i[order], j[order], c[order], d[order]


def find_pairs(clip: np.ndarray, dino: np.ndarray, clip_threshold: float = DEFAULT_CLIP_THRESHOLD,
               dino_threshold: float = DEFAULT_DINO_THRESHOLD, *, block: int = 4096, backend: str = "auto",
               max_pairs: int | None = None, progress: bool = False) -> SearchResult:
    """All pairs (i < j) with CLIP cosine > ``clip_threshold`` and DINOv2 cosine < ``dino_threshold``
    (both strict), sorted by the gap (CLIP - DINOv2) descending, then (i, j).

    ``clip`` [n, E] and ``dino`` [n, D] are embeddings (unit rows, as the cache stores them; the
    cosines are computed exactly anyway). Memory beyond the inputs is bounded by the tile:
    ``block`` x ``block`` float32 similarities (numpy) or results (FAISS), plus the kept pairs
    (``max_pairs`` caps them, keeping the largest gaps, so that degenerate embeddings that make
    every pair a candidate cannot exhaust memory; ``found`` still counts them all).
    """
    started = time.perf_counter()
    if block < 1:
        raise ValueError(f"block: must be >= 1, got {block}")
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs: must be >= 0, got {max_pairs}")
    clip = np.ascontiguousarray(clip, dtype=np.float32)
    dino = np.ascontiguousarray(dino, dtype=np.float32)
    n = clip.shape[0]
    if dino.shape[0] != n:
        raise ValueError(f"find_pairs: {n} CLIP rows but {dino.shape[0]} DINOv2 rows")
    backend = resolve_backend(backend)
    radius = float(clip_threshold) - CANDIDATE_MARGIN
    clip_norms, dino_norms = _row_norms(clip), _row_norms(dino)
    kept: list[tuple[np.ndarray, ...]] = []
    buffered = candidates = found = 0
    truncated = False
    floor = -np.inf  # once capped: the smallest gap kept; a pair below it can never be kept
    tiles = sum(len(rows) for _, _, rows in _tiles(n, block))
    faiss = _faiss() if backend == "faiss" else None
    bar = _progress(total=tiles, desc="search", unit="tile", enabled=progress)
    try:
        for c0, c1, row_blocks in _tiles(n, block):
            index = None
            if faiss is not None:
                index = faiss.IndexFlatIP(clip.shape[1])
                index.add(clip[c0:c1])
            for r0, r1 in row_blocks:
                if index is not None:
                    lims, _, labels = index.range_search(clip[r0:r1], radius)
                    ii = np.repeat(np.arange(r0, r1, dtype=np.int64), np.diff(lims).astype(np.int64))
                    jj = labels.astype(np.int64) + c0
                else:
                    sims = clip[r0:r1] @ clip[c0:c1].T
                    ii, jj = np.nonzero(sims > radius)
                    del sims
                    ii, jj = ii.astype(np.int64) + r0, jj.astype(np.int64) + c0
                if r0 == c0:  # a diagonal tile: each pair once, never an image with itself
                    upper = jj > ii
                    ii, jj = ii[upper], jj[upper]
                if len(ii):
                    cc = exact_cosines(clip, clip_norms, ii, jj)
                    hit = cc > clip_threshold
                    ii, jj, cc = ii[hit], jj[hit], cc[hit]
                    candidates += len(ii)
                    dd = exact_cosines(dino, dino_norms, ii, jj)
                    blind = dd < dino_threshold
                    found += int(blind.sum())
                    blind &= (cc - dd) >= floor
                    if blind.any():
                        kept.append((ii[blind], jj[blind], cc[blind], dd[blind]))
                        buffered += int(blind.sum())
                        if max_pairs is not None and buffered > 2 * max_pairs + _PRUNE_SLACK:
                            kept = [_top(*(np.concatenate(p) for p in zip(*kept, strict=True)), max_pairs)]
                            buffered = len(kept[0][0])
                            floor = float(kept[0][2][-1] - kept[0][3][-1]) if buffered else np.inf
                            truncated = True
                bar.update(1)
    finally:
        bar.close()
    if kept:
        i, j, c, d = (np.concatenate(p) for p in zip(*kept, strict=True))
    else:
        i = j = np.zeros(0, np.int64)
        c = d = np.zeros(0, np.float64)
    i, j, c, d = _top(i, j, c, d, len(i) if max_pairs is None else max_pairs)
    truncated = truncated or (max_pairs is not None and found > max_pairs)
    return SearchResult(i, j, c, d, candidates, found, truncated, backend, block, tiles,
                        time.perf_counter() - started)


# ---- progress -------------------------------------------------------------------------------------


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, unit: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


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


async def _embed(todo: Sequence[ImageRef], cache: EmbeddingCache, client, limits: dict[str, int], *, batch: int,
                 concurrency: int, timeout: float | None, failures: list[Failure], stats: EmbedStats,
                 progress: bool) -> None:
    isolate = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    max_bytes = int(limits.get("max_image_bytes") or 20 << 20)
    budget = int(limits.get("max_message_bytes") or max_bytes + (1 << 20)) - (1 << 16)
    batch = max(1, min(batch, int(limits.get("max_embed_images") or batch)))
    gate = asyncio.Semaphore(concurrency)
    in_flight: set[asyncio.Task] = set()
    fatal: list[BaseException] = []
    bar = _progress(total=len(todo), desc="embed", unit="img", enabled=progress)

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


# ---- outputs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairRow:
    path_a: str
    path_b: str
    clip_cosine: float
    dino_cosine: float
    file_a: Path | None = None
    file_b: Path | None = None

    @property
    def gap(self) -> float:
        return self.clip_cosine - self.dino_cosine


PAIR_COLUMNS = ("path_a", "path_b", "clip_cosine", "dino_cosine", "gap")
FAILED_COLUMNS = ("path", "stage", "reason")


def write_pairs_csv(path: Path, pairs: Iterable[PairRow]) -> int:
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(PAIR_COLUMNS)
        for p in pairs:
            writer.writerow([p.path_a, p.path_b, f"{p.clip_cosine:.8f}", f"{p.dino_cosine:.8f}", f"{p.gap:.8f}"])
            n += 1
    return n


def write_failed_csv(path: Path, failures: Iterable[Failure]) -> int:
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(FAILED_COLUMNS)
        for failure in failures:
            writer.writerow([failure.path, failure.stage, failure.reason])
            n += 1
    return n


@dataclass(frozen=True)
class SheetLayout:
    tiles: int
    columns: int
    rows: int
    tile_size: tuple[int, int]
    size: tuple[int, int]


_PAD = 8
_LINE = 16
_CAPTION_LINES = 3
_HEADER = 2 * _LINE + 2 * _PAD


def sheet_layout(tiles: int, thumb: int = 192, columns: int = 3) -> SheetLayout:
    """Where the contact sheet puts ``tiles`` pair tiles (two thumbnails and three caption lines)."""
    tile_w = 2 * thumb + 3 * _PAD
    tile_h = thumb + 3 * _PAD + _CAPTION_LINES * _LINE
    cols = max(1, min(columns, tiles))
    rows = -(-tiles // cols) if tiles else 0
    width = max(cols * tile_w, 640)
    height = _HEADER + (rows * tile_h if tiles else 2 * _LINE + _PAD)
    return SheetLayout(tiles, cols, rows, (tile_w, tile_h), (width, height))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _thumbnail(file: Path | None, thumb: int):
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (thumb, thumb), (235, 235, 235))
    try:
        if file is None:
            raise OSError("no file")
        image = decode_image(file.read_bytes())
    except (OSError, ImageError):
        ImageDraw.Draw(canvas).text((8, thumb // 2 - 8), "unreadable", fill=(160, 0, 0), font=_font(12))
        return canvas
    image.thumbnail((thumb, thumb))
    canvas.paste(image, ((thumb - image.width) // 2, (thumb - image.height) // 2))
    return canvas


def _fit(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def write_contact_sheet(path: Path, pairs: Sequence[PairRow], title: str, note: str = "", thumb: int = 192,
                        columns: int = 3) -> SheetLayout:
    """A PNG of ``pairs`` (in order) as tiles: image A | image B, then rank and gap, both cosines and
    the two names. Returns the layout (``tiles == len(pairs)``)."""
    from PIL import Image, ImageDraw

    layout = sheet_layout(len(pairs), thumb, columns)
    sheet = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((_PAD, _PAD), title, fill="black", font=_font(14))
    if note:
        draw.text((_PAD, _PAD + _LINE), note, fill=(170, 0, 0), font=_font(11))
    if not pairs:
        draw.text((_PAD, _HEADER), "no CLIP-blind pairs at these thresholds", fill=(90, 90, 90), font=_font(13))
    tile_w, tile_h = layout.tile_size
    font = _font(12)
    chars = max(12, thumb // 7)
    for k, pair in enumerate(pairs):
        x0 = (k % layout.columns) * tile_w
        y0 = _HEADER + (k // layout.columns) * tile_h
        draw.rectangle((x0 + 2, y0 + 2, x0 + tile_w - 3, y0 + tile_h - 3), outline=(200, 200, 200))
        sheet.paste(_thumbnail(pair.file_a, thumb), (x0 + _PAD, y0 + _PAD))
        sheet.paste(_thumbnail(pair.file_b, thumb), (x0 + 2 * _PAD + thumb, y0 + _PAD))
        ty = y0 + 2 * _PAD + thumb
        draw.text((x0 + _PAD, ty), f"#{k + 1}  gap {pair.gap:.3f}", fill="black", font=font)
        draw.text((x0 + _PAD, ty + _LINE), f"CLIP {pair.clip_cosine:.4f}   DINOv2 {pair.dino_cosine:.4f}",
                  fill=(0, 70, 160), font=font)
        draw.text((x0 + _PAD, ty + 2 * _LINE), _fit(Path(pair.path_a).name, chars), fill=(80, 80, 80), font=font)
        draw.text((x0 + 2 * _PAD + thumb, ty + 2 * _LINE), _fit(Path(pair.path_b).name, chars), fill=(80, 80, 80),
                  font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return layout


# ---- the run ----------------------------------------------------------------------------------------------


@dataclass
class MineOptions:
    images: Path
    out: Path = DEFAULT_OUT
    server: str = DEFAULT_TARGET
    clip_threshold: float = DEFAULT_CLIP_THRESHOLD
    dino_threshold: float = DEFAULT_DINO_THRESHOLD
    batch: int = 32
    concurrency: int = 2
    top: int = 24
    block: int = 4096
    backend: str = "auto"
    max_pairs: int | None = 1_000_000
    timeout: float | None = 300.0
    cache: Path | None = None  # default: <out>/embeddings
    progress: bool = True

    def check(self) -> None:
        for name in ("batch", "concurrency", "block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.top < 0:
            raise ValueError(f"top: must be >= 0, got {self.top}")
        for name in ("clip_threshold", "dino_threshold"):
            value = getattr(self, name)
            if not np.isfinite(value):
                raise ValueError(f"{name.replace('_', '-')}: must be a finite number, got {value}")
        resolve_backend(self.backend)


@dataclass
class MineReport:
    summary: dict[str, Any]
    pairs: list[PairRow]
    failures: list[Failure]
    out: Path
    exit_code: int = 0
    outputs: dict[str, str] = field(default_factory=dict)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _default_client(target: str, timeout: float | None):
    return AsyncMofServeClient(target, timeout=timeout)


async def _embed_phase(options: MineOptions, refs: Sequence[ImageRef], failures: list[Failure], cache_dir: Path,
                       client_factory: Callable[[str, float | None], Any],
                       ) -> tuple[EmbeddingCache, Any, EmbedStats, list[ImageRef]]:
    stats = EmbedStats(listed=len(refs))
    async with client_factory(options.server, options.timeout) as client:
        info = await client.server_info(timeout=min(options.timeout or 30.0, 30.0))
        prov = info.provenance
        cache = EmbeddingCache(cache_dir, model_key(prov.profile, prov.model_versions, prov.random_weights))
        try:
            todo: list[ImageRef] = []
            for ref in refs:
                try:
                    stamp = FileStamp.of(ref.path)
                    row = cache.lookup(ref.path, stamp, ref.path.read_bytes)
                except OSError as error:
                    failures.append(Failure(ref.display, "read", f"{type(error).__name__}: {error.strerror or error}"))
                    continue
                if row is None:
                    todo.append(ref)
                else:
                    stats.cached += 1
                    stats.rows[str(ref.path)] = row
            cache.reserve(len(todo))
            started = time.perf_counter()
            await _embed(todo, cache, client, info.limits, batch=options.batch, concurrency=options.concurrency,
                         timeout=options.timeout, failures=failures, stats=stats, progress=options.progress)
            stats.embed_seconds = time.perf_counter() - started
        except BaseException:
            cache.close()
            raise
    ok = [r for r in refs if str(r.path) in stats.rows]
    return cache, info, stats, ok


def mine(options: MineOptions, client_factory: Callable[[str, float | None], Any] | None = None) -> MineReport:
    """Run the whole miner; raises ``FileNotFoundError`` / ``ValueError`` for bad input and
    ``MofServeError`` when the server cannot be used (the cache keeps what was embedded).
    ``client_factory(target, timeout)`` gives an async client as an async context manager
    (default: ``AsyncMofServeClient``; the unit tests pass a fake)."""
    t0 = time.perf_counter()
    options.check()
    refs, failures = collect_images(Path(options.images))
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(options.cache) if options.cache else out / "embeddings"
    scan_s = time.perf_counter() - t0
    cache, info, stats, ok = asyncio.run(_embed_phase(options, refs, failures, cache_dir,
                                                      client_factory or _default_client))
    try:
        stats.failed = len(failures)
        rows = np.array([stats.rows[str(r.path)] for r in ok], dtype=np.int64)
        clip, dino = cache.gather(rows)
        invalidated, cache_rows, cache_bytes = cache.invalidated, cache.count, cache.disk_bytes()
    finally:
        cache.close()
    result = find_pairs(clip, dino, options.clip_threshold, options.dino_threshold, block=options.block,
                        backend=options.backend, max_pairs=options.max_pairs, progress=options.progress)
    pairs = [PairRow(ok[a].display, ok[b].display, float(c), float(d), ok[a].path, ok[b].path)
             for a, b, c, d in zip(result.i.tolist(), result.j.tolist(), result.clip, result.dino, strict=True)]
    t_out = time.perf_counter()
    prov = info.provenance
    note = RANDOM_WEIGHTS_NOTE.format(profile=prov.profile) if prov.random_weights else ""
    outputs = {"pairs_csv": str(out / "pairs.csv"), "failed_csv": str(out / "failed.csv"),
               "summary_json": str(out / "summary.json"), "contact_sheet": str(out / "contact_sheet.png")}
    write_pairs_csv(Path(outputs["pairs_csv"]), pairs)
    write_failed_csv(Path(outputs["failed_csv"]), failures)
    title = (f"CLIP-blind pairs: CLIP cos > {options.clip_threshold:g}, DINOv2 cos < {options.dino_threshold:g} "
             f"(top {min(options.top, len(pairs))} of {result.found}, {len(ok)} images)")
    sheet_note = SHEET_NOTE.format(profile=prov.profile) if prov.random_weights else ""
    layout = write_contact_sheet(Path(outputs["contact_sheet"]), pairs[:options.top], title, sheet_note)
    outputs_s = time.perf_counter() - t_out
    failed_by_stage: dict[str, int] = {}
    for failure in failures:
        failed_by_stage[failure.stage] = failed_by_stage.get(failure.stage, 0) + 1
    summary: dict[str, Any] = {
        "images": {"source": str(options.images), "usable": len(ok), "from_cache": stats.cached,
                   "embedded_now": stats.embedded, "failed": len(failures), "failed_by_stage": failed_by_stage},
        "thresholds": {"clip_cosine_gt": options.clip_threshold, "dino_cosine_lt": options.dino_threshold,
                       "strict": True},
        "pairs": {"clip_candidates": result.candidates, "clip_blind": result.found, "written": len(pairs),
                  "truncated": result.truncated, "max_pairs": options.max_pairs},
        "search": {"backend": result.backend, "block": result.block, "tiles": result.tiles,
                   "clip_dim": int(clip.shape[1]) if clip.ndim == 2 else 0,
                   "dino_dim": int(dino.shape[1]) if dino.ndim == 2 else 0,
                   "candidate_margin": CANDIDATE_MARGIN},
        "timings_s": {"scan": round(scan_s, 4), "embed": round(stats.embed_seconds, 4),
                      "search": round(result.seconds, 4), "outputs": round(outputs_s, 4),
                      "total": round(time.perf_counter() - t0, 4)},
        "rates": {"embed_s_per_10k_images": (round(stats.embed_seconds / stats.embedded * 1e4, 2)
                                             if stats.embedded else None),
                  "embed_calls": stats.embed_calls},
        "server": {"target": options.server, "version": info.version, "profile": prov.profile,
                   "model_versions": dict(prov.model_versions), "random_weights": prov.random_weights,
                   "notice": prov.notice, "limits": dict(info.limits)},
        "random_weights_note": note,
        "cache": {"dir": str(cache_dir), "rows": cache_rows, "bytes": cache_bytes, "invalidated": invalidated},
        "contact_sheet": {"tiles": layout.tiles, "columns": layout.columns, "size": list(layout.size)},
        "outputs": outputs,
        "peak_rss_mib": round(_peak_rss_mib(), 1),
    }
    write_json(outputs["summary_json"], summary)
    exit_code = 0 if ok else 1  # nothing usable at all is a failed run (failed.csv says why)
    return MineReport(summary, pairs, failures, out, exit_code, outputs)


# ---- command line -------------------------------------------------------------------------------------


def arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mofserve mine``."""
    parser.add_argument("--images", required=True, type=Path,
                        help="a folder (searched recursively for jpg/jpeg/png/webp/bmp/gif/tiff) or a text file "
                             "with one image path a line (relative paths: relative to the file's folder)")
    parser.add_argument("--server", default=DEFAULT_TARGET, help=f"gRPC address (default {DEFAULT_TARGET})")
    parser.add_argument("--clip-threshold", type=float, default=DEFAULT_CLIP_THRESHOLD,
                        help="keep pairs with CLIP cosine > this (default 0.95)")
    parser.add_argument("--dino-threshold", type=float, default=DEFAULT_DINO_THRESHOLD,
                        help="... and DINOv2 cosine < this (default 0.6)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder: pairs.csv, failed.csv, summary.json, contact_sheet.png, embeddings/ "
                             f"(default {DEFAULT_OUT})")
    parser.add_argument("--batch", type=int, default=32,
                        help="images per Embed call (default 32; capped by the server's max_embed_images)")
    parser.add_argument("--concurrency", type=int, default=2, help="Embed calls in flight (default 2)")
    parser.add_argument("--top", type=int, default=24, help="pairs on the contact sheet (default 24)")
    parser.add_argument("--block", type=int, default=4096,
                        help="rows per search tile: memory ~ block^2 x 4 bytes (default 4096)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="candidate search: faiss (IndexFlatIP.range_search), numpy, or auto (faiss if installed)")
    parser.add_argument("--max-pairs", type=int, default=1_000_000,
                        help="keep at most this many pairs (the largest gaps; all are counted) (default 1000000)")
    parser.add_argument("--cache", type=Path, help="embedding cache folder (default OUT/embeddings)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of each Embed call, seconds")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def options_from_args(args: argparse.Namespace) -> MineOptions:
    return MineOptions(images=args.images, out=args.out, server=args.server, clip_threshold=args.clip_threshold,
                       dino_threshold=args.dino_threshold, batch=args.batch, concurrency=args.concurrency,
                       top=args.top, block=args.block, backend=args.backend, max_pairs=args.max_pairs,
                       timeout=args.timeout, cache=args.cache, progress=not args.quiet)


def format_report(report: MineReport) -> str:
    s = report.summary
    im, pr, t = s["images"], s["pairs"], s["timings_s"]
    lines = [
        f"images: {im['usable']} usable ({im['from_cache']} from the cache, {im['embedded_now']} embedded now), "
        f"{im['failed']} failed",
        f"pairs: {pr['clip_blind']} CLIP-blind (CLIP cos > {s['thresholds']['clip_cosine_gt']:g}, "
        f"DINOv2 cos < {s['thresholds']['dino_cosine_lt']:g}) among {pr['clip_candidates']} CLIP candidates"
        + (f"; kept the {pr['written']} largest gaps" if pr["truncated"] else ""),
        f"time: embed {t['embed']:.1f} s, search {t['search']:.1f} s ({s['search']['backend']}), "
        f"total {t['total']:.1f} s",
    ]
    lines += [f"{name}: {path}" for name, path in report.outputs.items()]
    if s["random_weights_note"]:
        lines.append(f"note: {s['random_weights_note']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``mofserve mine``: 1 when the server fails mid-way (what was embedded stays cached for a rerun)."""
    try:
        report = mine(options_from_args(args))
    except MofServeError as error:
        print(f"mofserve mine: error: server {args.server}: {error} (embeddings done so far are cached; "
              "rerun to resume)", file=sys.stderr)
        return 1
    except CacheLockedError as error:
        print(f"mofserve mine: error: {error}", file=sys.stderr)
        return 1
    print(format_report(report))
    if report.failures:
        print(f"mofserve mine: {len(report.failures)} image(s) failed, see {report.outputs['failed_csv']}",
              file=sys.stderr)
    if report.exit_code:
        print("mofserve mine: error: no image could be embedded", file=sys.stderr)
    return report.exit_code


# ---- search benchmark (docs/evaluation.md) ------------------------------------------------------------


def synthetic_embeddings(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, 16384):
        chunk = rng.standard_normal((min(n, s + 16384) - s, dim), dtype=np.float32)
        x[s:s + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return x


def benchmark_search(n: int, clip_dim: int, dino_dim: int, *, block: int = 4096, backend: str = "auto",
                     planted: int = 1000, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """The search alone on ``n`` random unit vectors, with ``planted`` CLIP-blind pairs (CLIP
    cosine ~0.98, independent DINOv2 vectors) that it must find."""
    clip = synthetic_embeddings(n, clip_dim, seed)
    dino = synthetic_embeddings(n, dino_dim, seed + 1)
    rng = np.random.default_rng(seed + 2)
    picks = rng.permutation(n)[:2 * planted].reshape(-1, 2)
    noise = synthetic_embeddings(len(picks), clip_dim, seed + 3)
    near = clip[picks[:, 0]] + 0.2 * noise
    clip[picks[:, 1]] = near / np.linalg.norm(near, axis=1, keepdims=True)
    rss_inputs = _peak_rss_mib()
    result = find_pairs(clip, dino, block=block, backend=backend, progress=progress)
    want = {tuple(sorted(p)) for p in picks.tolist()}
    got = set(zip(result.i.tolist(), result.j.tolist(), strict=True))
    return {"n": n, "clip_dim": clip_dim, "dino_dim": dino_dim, "block": block, "backend": result.backend,
            "seconds": round(result.seconds, 2), "candidates": result.candidates, "found": result.found,
            "planted_found": len(want & got), "planted": len(want),
            "input_mib": round((clip.nbytes + dino.nbytes) / 2**20, 1), "peak_rss_mib_before_search": rss_inputs,
            "peak_rss_mib": round(_peak_rss_mib(), 1), "threads": os.cpu_count()}


def _bench_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mofserve.evaluation.mining",
                                     description="time the all-pairs search on synthetic embeddings")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--clip-dim", type=int, default=768)
    parser.add_argument("--dino-dim", type=int, default=1024)
    parser.add_argument("--block", type=int, default=4096)
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--planted", type=int, default=1000)
    args = parser.parse_args(argv)
    print(json.dumps(benchmark_search(args.n, args.clip_dim, args.dino_dim, block=args.block, backend=args.backend,
                                      planted=args.planted, progress=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_bench_main())
