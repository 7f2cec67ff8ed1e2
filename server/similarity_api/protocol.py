"""The wire format of ``POST /v1/mofserve/similarity`` (pure functions, no I/O).

Request (JSON)::

    {"images": ["data:image/png;base64,...", "data:image/jpeg;base64,..."],
     "clip_threshold": 0.95, "dinov2_threshold": 0.6, "patch_maps": true}

``images``: exactly two base64 ``data:`` URLs (as in chat completions: never fetched from the
network). The thresholds are optional (the paper's by default); ``patch_maps: false`` leaves the
per-patch maps out. Errors are OpenAI's shape (``openai_protocol.ProtocolError``), ``param``
naming the field (``images[1]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mofserve.server import openai_protocol as P
from mofserve.server.engine import Limits, ServingInfo

#: The paper's CLIP-blind thresholds (the same as ``mofserve mine``'s defaults): CLIP cosine above
#: the first (CLIP sees the two alike), DINOv2 cosine below the second (DINOv2 sees them apart).
CLIP_THRESHOLD = 0.95
DINOV2_THRESHOLD = 0.6
FIELDS = frozenset({"images", "clip_threshold", "dinov2_threshold", "patch_maps"})
OBJECT = "mofserve.similarity"


@dataclass(frozen=True)
class SimilarityRequest:
    images: tuple[bytes, bytes]
    clip_threshold: float = CLIP_THRESHOLD
    dinov2_threshold: float = DINOV2_THRESHOLD
    patch_maps: bool = True


def _threshold(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not -1.0 <= float(value) <= 1.0:
        raise P.ProtocolError(400, f"{name}: must be a number within [-1, 1], got {value!r}", name)
    return float(value)


def parse_request(body: Any, limits: Limits) -> SimilarityRequest:
    """Validate a request body; ``ProtocolError`` names the first bad field (413 for an image over
    ``max_image_bytes``, checked before decoding)."""
    if not isinstance(body, Mapping):
        raise P.ProtocolError(400, f"body: must be a JSON object, got {type(body).__name__}")
    for name in body:
        if name not in FIELDS:
            raise P.ProtocolError(400, f"{name}: unrecognized request argument; expected "
                                       + ", ".join(sorted(FIELDS)), name, "unknown_parameter")
    images = body.get("images")
    if not isinstance(images, list) or len(images) != 2:
        got = f"{len(images)} items" if isinstance(images, list) else type(images).__name__
        raise P.ProtocolError(400, f"images: must be a list of exactly two data URLs "
                                   f"('data:image/png;base64,...'), got {got}", "images")
    decoded = tuple(P.decode_data_url(url, f"images[{i}]", limits.max_image_bytes) for i, url in enumerate(images))
    patch_maps = body.get("patch_maps", True)
    if not isinstance(patch_maps, bool):
        raise P.ProtocolError(400, f"patch_maps: must be a boolean, got {type(patch_maps).__name__}", "patch_maps")
    return SimilarityRequest(images=decoded,  # type: ignore[arg-type]
                             clip_threshold=_threshold(body, "clip_threshold", CLIP_THRESHOLD),
                             dinov2_threshold=_threshold(body, "dinov2_threshold", DINOV2_THRESHOLD),
                             patch_maps=patch_maps)


def verdict(clip: float, dino: float, clip_threshold: float, dinov2_threshold: float) -> tuple[bool, str]:
    """Whether the two images are a CLIP-blind pair, and why in words."""
    clip_alike, dino_apart = clip > clip_threshold, dino < dinov2_threshold
    c, d = f"CLIP {clip:.3f} {'>' if clip_alike else '<='} {clip_threshold:g}", \
        f"DINOv2 {dino:.3f} {'<' if dino_apart else '>='} {dinov2_threshold:g}"
    if clip_alike and dino_apart:
        return True, f"CLIP-blind pair: CLIP sees the two as the same ({c}) while DINOv2 tells them apart ({d})"
    if clip_alike:
        return False, f"not CLIP-blind: both encoders see the two alike ({c}; {d})"
    if dino_apart:
        return False, f"not CLIP-blind: CLIP tells them apart too ({c}; {d})"
    return False, f"not CLIP-blind: CLIP tells them apart ({c}), and DINOv2 sees them alike ({d})"


def _rounded(rows: list[list[float]]) -> list[list[float]]:
    return [[round(float(v), 4) for v in row] for row in rows]


def similarity_response(request: SimilarityRequest, result, info: ServingInfo, *, image_size: int | None,
                        aspect: str | None) -> dict[str, Any]:
    """The response body for a ``serving.Similarity`` result."""
    blind, words = verdict(result.clip_cosine, result.dino_cosine, request.clip_threshold, request.dinov2_threshold)
    encoders = {}
    for name, cosine, threshold, maps, passes in (
            ("clip", result.clip_cosine, request.clip_threshold, result.clip_patches,
             result.clip_cosine > request.clip_threshold),
            ("dinov2", result.dino_cosine, request.dinov2_threshold, result.dino_patches,
             result.dino_cosine < request.dinov2_threshold)):
        entry: dict[str, Any] = {"cosine": round(cosine, 6), "threshold": threshold, "passes": bool(passes),
                                 "patch_grid": list(maps.shape),
                                 "patch_mean": round(float(maps.mean()), 6) if maps.size else None}
        if request.patch_maps:
            entry["patch_cosines"] = _rounded(maps.tolist())
        encoders[name] = entry
    return {
        "object": OBJECT,
        "clip": encoders["clip"],
        "dinov2": encoders["dinov2"],
        "clip_blind": blind,
        "verdict": words,
        "view": {"image_size": image_size, "aspect": aspect},
        "timings": result.timings,
        "profile": info.profile,
        "random_weights": info.random_weights,
        "notice": info.notice or None,
    }
