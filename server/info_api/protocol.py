"""The body of ``GET /v1/mofserve/info`` (pure: built from the engine's ``ServingInfo`` and the
serve settings the caller hands over)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache
from importlib import metadata
from typing import Any

from mofserve.core.profiles import get_profile
from mofserve.core.targets import mode_encoders
from mofserve.core.tensors import FusionMode
from mofserve.server.engine import Limits, ServingInfo
from mofserve.server.openai_protocol import model_id
from mofserve.server.similarity_api.protocol import CLIP_THRESHOLD, DINOV2_THRESHOLD

OBJECT = "mofserve.info"
#: Targets whose encoders report their time (python-backend encoders; ~0 ms for an image found in
#: their feature cache). gpu-onnx / gpu-trt run native encoders: no timing, no feature cache.
TIMED_ENCODER_TARGETS = frozenset({"cpu", "gpu-torch"})


@dataclass(frozen=True)
class ServerFacts:
    """What the front-end knows beyond ``ServingInfo``: settings of ``mofserve serve``."""

    target: str = "cpu"
    auth: bool = False
    tls: bool = False
    triton_metrics: bool = False  # GET /metrics/triton exists (Triton's page, feature-cache counters)
    playground: bool = False
    split: bool = False  # serve --triton-url: a Triton this front-end does not own


@cache
def package_version() -> str:
    """The installed distribution's version (read from its metadata: the server floor does not
    import the ``mofserve`` top package)."""
    try:
        return metadata.version("mofserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def info_body(info: ServingInfo, limits: Limits, facts: ServerFacts, *, ready: bool) -> dict[str, Any]:
    try:
        profile = get_profile(info.profile)
        image = {"size": profile.image_size, "patch_size": profile.patch_size, "aspect": profile.aspect,
                 "patch_grid": profile.image_size // profile.patch_size}
    except ValueError:
        image = None
    return {
        "object": OBJECT,
        "version": package_version(),
        "ready": ready,
        "profile": info.profile,
        "random_weights": info.random_weights,
        "notice": info.notice or None,
        "versions": dict(info.versions),
        "default_alpha": info.default_alpha,
        "models": [{"id": model_id(mode), "mode": mode.value, "takes_alpha": mode is FusionMode.ADDITIVE,
                    "encoders": list(mode_encoders(mode))} for mode in FusionMode],
        "limits": asdict(limits),
        "image": image,
        "clip_blind_thresholds": {"clip_cosine_gt": CLIP_THRESHOLD, "dinov2_cosine_lt": DINOV2_THRESHOLD},
        "target": facts.target,
        "encoder_timings": facts.target in TIMED_ENCODER_TARGETS,
        "split_deployment": facts.split,
        "auth": facts.auth,
        "tls": facts.tls,
        "routes": {"metrics": "/metrics", "triton_metrics": "/metrics/triton" if facts.triton_metrics else None,
                   "similarity": "/v1/mofserve/similarity", "playground": "/" if facts.playground else None},
    }
