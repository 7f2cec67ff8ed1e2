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

Steps 1 and 2 live in ``image_embedding.py``, step 3 in ``pair_search.py`` and the contact sheet
in ``contact_sheet.py``; this module runs them, writes the CSVs and ``summary.json``, and is the
command.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mofserve.clients import AsyncMofServeClient
from mofserve.clients.client import DEFAULT_TARGET, MofServeError
from mofserve.core.reports import write_json

from .contact_sheet import write_contact_sheet
from .embedding_cache import CacheLockedError, EmbeddingCache, FileStamp, model_key
from .image_embedding import EmbedStats, Failure, ImageRef, collect_images, embed_images
from .pair_search import (
    BACKENDS,
    CANDIDATE_MARGIN,
    DEFAULT_CLIP_THRESHOLD,
    DEFAULT_DINO_THRESHOLD,
    PairRow,
    find_pairs,
    peak_rss_mib,
    resolve_backend,
)

DEFAULT_OUT = Path("results/mine")
RANDOM_WEIGHTS_NOTE = ("the server runs seeded random weights (profile {profile}): its embeddings, and so these "
                       "pairs, are not meaningful; serve --profile paper to mine real CLIP-blind pairs")
SHEET_NOTE = "seeded random weights (profile {profile}): these pairs are not meaningful"


# ---- outputs ------------------------------------------------------------------------------------------

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
            await embed_images(todo, cache, client, info.limits, batch=options.batch, concurrency=options.concurrency,
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
        "peak_rss_mib": round(peak_rss_mib(), 1),
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
