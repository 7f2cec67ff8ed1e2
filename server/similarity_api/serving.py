"""The serving logic of ``POST /v1/mofserve/similarity``: one ``embed`` call per image (side by
side, so an image Triton cannot decode is named), then the cosines.

``embed`` (docs/architecture.md) runs preprocess, ``clip_vision`` and ``dinov2_vision`` and outputs
the pooled embeddings (``CLIP_EMBEDS``, ``DINO_CLS``) and both encoders' patch features
(``CLIP_FEATURES`` [P, Dc], ``DINO_FEATURES`` [P, Dd], CLS dropped) in spatial order. The patch
map is the cosine of patch i of the first image with patch i of the second, laid out on the
sqrt(P) x sqrt(P) grid of the square the encoders see (``TritonEngine.embed_patches``).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import numpy as np

from mofserve.server.engine import EngineError, TritonEngine


@dataclass
class Similarity:
    clip_cosine: float
    dino_cosine: float
    clip_patches: np.ndarray  # [rows, cols] cosines of same-position patches
    dino_patches: np.ndarray
    timings: dict = field(default_factory=dict)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def patch_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each patch of ``a`` [P, D] with the same patch of ``b``, on a square grid when P is
    a square (the encoders' patch grid, row-major), else one row."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise EngineError("internal", f"embed: patch features of different shapes {a.shape} and {b.shape}")
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    values = np.einsum("pd,pd->p", a, b) / norms
    side = math.isqrt(values.size)
    return values.reshape(side, side) if side * side == values.size else values.reshape(1, -1)


async def similarity(engine: TritonEngine, images: tuple[bytes, bytes], timeout: float | None) -> Similarity:
    """Both images through ``embed`` side by side (``TritonEngine.embed_patches``: an image Triton
    cannot decode is named ``images[i]``, as data), then the cosines."""
    started = time.perf_counter()
    first, second = await asyncio.gather(*(engine.embed_patches(image, timeout, field=f"images[{i}]")
                                           for i, image in enumerate(images)))
    per_image = []
    for seen in (first, second):
        entry = {}
        for key in ("preprocess_ms", "clip_ms", "dinov2_ms"):
            value = getattr(seen.timings, key)
            entry[key] = round(value, 3) if value > 0 else None  # None: not timed on this target
        per_image.append(entry)
    return Similarity(
        clip_cosine=cosine(first.clip, second.clip),
        dino_cosine=cosine(first.dino, second.dino),
        clip_patches=patch_cosines(first.clip_patches, second.clip_patches),
        dino_patches=patch_cosines(first.dino_patches, second.dino_patches),
        timings={"images": per_image, "total_ms": round((time.perf_counter() - started) * 1e3, 3)},
    )
