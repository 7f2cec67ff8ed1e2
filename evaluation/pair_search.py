"""The blockwise all-pairs search of ``mofserve mine``: every pair of images whose CLIP cosine is
above one threshold while their DINOv2 cosine is below another, in memory bounded by the tile.

It works on embedding matrices only (no server, no files), so the miner, its unit tests and the
search benchmark (``python -m mofserve.evaluation.pair_search``, docs/evaluation.md) run the same
code; ``mining.py`` feeds it the cached embeddings and names the pairs it returns.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .progress import progress_bar

DEFAULT_CLIP_THRESHOLD = 0.95
DEFAULT_DINO_THRESHOLD = 0.6
BACKENDS = ("auto", "faiss", "numpy")
# Candidates come from float32 products (BLAS/FAISS), whose rounding is ~1e-6 at these widths;
# they are fetched this far below the threshold and then scored exactly, so that a pair's fate
# never depends on the backend, the block size or the tile it fell in.
CANDIDATE_MARGIN = 1e-3
_PRUNE_SLACK = 1 << 16  # kept pairs beyond 2 x max_pairs before the buffer is cut back to max_pairs
_SCORE_ELEMENTS = 1 << 22  # float64 elements per chunk when scoring candidates (32 MiB per operand)


@dataclass(frozen=True)
class PairRow:
    """One CLIP-blind pair named by its images: a row of ``pairs.csv`` and a tile of the contact
    sheet (``file_a`` / ``file_b``: the files to draw, when known)."""

    path_a: str
    path_b: str
    clip_cosine: float
    dino_cosine: float
    file_a: Path | None = None
    file_b: Path | None = None

    @property
    def gap(self) -> float:
        return self.clip_cosine - self.dino_cosine


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
    bar = progress_bar(total=tiles, desc="search", unit="tile", enabled=progress)
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


# ---- search benchmark (docs/evaluation.md) ------------------------------------------------------------


def peak_rss_mib() -> float:
    """The process's peak resident memory so far, MiB (also in the miner's summary.json)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
    rss_inputs = peak_rss_mib()
    result = find_pairs(clip, dino, block=block, backend=backend, progress=progress)
    want = {tuple(sorted(p)) for p in picks.tolist()}
    got = set(zip(result.i.tolist(), result.j.tolist(), strict=True))
    return {"n": n, "clip_dim": clip_dim, "dino_dim": dino_dim, "block": block, "backend": result.backend,
            "seconds": round(result.seconds, 2), "candidates": result.candidates, "found": result.found,
            "planted_found": len(want & got), "planted": len(want),
            "input_mib": round((clip.nbytes + dino.nbytes) / 2**20, 1), "peak_rss_mib_before_search": rss_inputs,
            "peak_rss_mib": round(peak_rss_mib(), 1), "threads": os.cpu_count()}


def _bench_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mofserve.evaluation.pair_search",
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
