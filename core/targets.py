"""Serving targets, and the encoders each fusion mode runs on every one of them.

The one home of both, so that the CLI, the serve settings, export and the front-end stop spelling
them: a target is how a repository runs its encoders and fusion (``export/repository.py`` says
how each differs); the models, tensors and modes (``core.tensors.FusionMode``) are the same on
every target, and so is which encoders a mode reads.
"""

from __future__ import annotations

from enum import StrEnum

from . import tensors as T
from .tensors import FusionMode


class Target(StrEnum):
    """Where and how a profile's repository runs (``mofserve export/serve/triton --target``)."""

    CPU = "cpu"  # python-backend models only; encoders on ONNX Runtime or OpenVINO
    GPU_ONNX = "gpu-onnx"  # native onnxruntime_onnx encoders (TensorRT execution provider, FP16)
    GPU_TRT = "gpu-trt"  # native tensorrt_plan encoders, built on the serving GPU
    GPU_TORCH = "gpu-torch"  # PyTorch encoders and fusion on the GPU (bf16), no ONNX

    @classmethod
    def parse(cls, value: str) -> Target:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"target: unknown target {value!r}; expected one of {', '.join(TARGETS)}") from None


TARGETS = tuple(t.value for t in Target)  # for argparse choices and messages

# The vision encoders by name, and the model that runs each. A single-encoder mode is named after
# its encoder; every other mode reads both.
ENCODER_MODELS = {FusionMode.CLIP.value: T.CLIP_VISION, FusionMode.DINOV2.value: T.DINOV2_VISION}


def mode_encoders(mode: FusionMode | str) -> tuple[str, ...]:
    """The encoders ``mode`` reads ("clip", "dinov2"), in that order: the ones its ensembles run and
    the front-end must have run once when it answers several modes for one image."""
    value = FusionMode.parse(str(mode)).value
    return (value,) if value in ENCODER_MODELS else tuple(ENCODER_MODELS)
