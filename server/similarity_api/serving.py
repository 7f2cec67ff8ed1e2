"""The serving logic of ``POST /v1/mofserve/similarity``: one ``embed`` call per image (side by
side, so an image Triton cannot decode is named), then the cosines.

``embed`` (docs/architecture.md) runs preprocess, ``clip_vision`` and ``dinov2_vision`` and outputs
the pooled embeddings (``CLIP_EMBEDS``, ``DINO_CLS``) and both encoders' patch features
(``CLIP_FEATURES`` [P, Dc], ``DINO_FEATURES`` [P, Dd], CLS dropped) in spatial order. The patch
map is the cosine of patch i of the first image with patch i of the second, laid out on the
sqrt(P) x sqrt(P) grid of the square the encoders see. ``TritonEngine.embed`` asks for the pooled
outputs only, so this calls the engine's deadline-bounded ``_infer`` for the patch features too.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc.aio as triton

from mofserve.core import tensors as T
from mofserve.server.engine import EngineError, TritonEngine

OUTPUTS = (T.CLIP_EMBEDS, T.DINO_CLS, T.CLIP_FEATURES, T.DINO_FEATURES, T.TIMING_PREPROCESS, T.TIMING_CLIP,
           T.TIMING_DINOV2)
_TIMINGS = {T.TIMING_PREPROCESS: "preprocess_ms", T.TIMING_CLIP: "clip_ms", T.TIMING_DINOV2: "dinov2_ms"}


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


async def _embed_one(engine: TritonEngine, image: bytes, index: int, timeout: float | None):
    tensor = triton.InferInput(T.IMAGE, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image]], dtype=object))
    try:
        return await engine._infer(T.EMBED, [tensor], list(OUTPUTS), timeout)
    except EngineError as error:  # name the image: "image: cannot decode" -> "images[1]: cannot decode"
        message = error.message
        if message.startswith("image:"):
            message = f"images[{index}]:" + message[len("image:"):]
        raise EngineError(error.code, message) from None


async def similarity(engine: TritonEngine, images: tuple[bytes, bytes], timeout: float | None) -> Similarity:
    started = time.perf_counter()
    results = await asyncio.gather(*(_embed_one(engine, image, i, timeout) for i, image in enumerate(images)))

    def first(name: str, i: int) -> np.ndarray:
        array = results[i].as_numpy(name)
        if array is None:
            raise EngineError("internal", f"embed: no {name} in Triton's answer")
        return array[0]

    per_image = []
    for result in results:
        entry = {}
        for name, key in _TIMINGS.items():
            array = result.as_numpy(name)
            value = float(np.asarray(array).reshape(-1)[0]) if array is not None else math.nan
            entry[key] = round(value, 3) if math.isfinite(value) else None  # None: not timed on this target
        per_image.append(entry)
    return Similarity(
        clip_cosine=cosine(first(T.CLIP_EMBEDS, 0), first(T.CLIP_EMBEDS, 1)),
        dino_cosine=cosine(first(T.DINO_CLS, 0), first(T.DINO_CLS, 1)),
        clip_patches=patch_cosines(first(T.CLIP_FEATURES, 0), first(T.CLIP_FEATURES, 1)),
        dino_patches=patch_cosines(first(T.DINO_FEATURES, 0), first(T.DINO_FEATURES, 1)),
        timings={"images": per_image, "total_ms": round((time.perf_counter() - started) * 1e3, 3)},
    )
