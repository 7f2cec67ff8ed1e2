"""Targets and which encoders a mode reads have one home (core/targets.py)."""

from __future__ import annotations

import pytest

from mofserve.core import tensors as T
from mofserve.core.targets import TARGETS, Target, mode_encoders
from mofserve.core.tensors import FusionMode


def test_targets_are_the_four_the_repository_builds():
    assert TARGETS == ("cpu", "gpu-onnx", "gpu-trt", "gpu-torch")
    assert Target.parse("gpu-trt") is Target.GPU_TRT
    with pytest.raises(ValueError, match="target: unknown target 'tpu'; expected one of cpu, gpu-onnx"):
        Target.parse("tpu")


def test_each_mode_reads_its_encoders_and_the_ensembles_run_them():
    from mofserve.export.repository import _encoders

    expected = {"clip": ("clip",), "dinov2": ("dinov2",), "additive": ("clip", "dinov2"),
                "interleaved": ("clip", "dinov2")}
    assert {m.value: mode_encoders(m) for m in FusionMode} == expected
    assert mode_encoders("dinov2") == ("dinov2",)
    assert _encoders(FusionMode.CLIP) == (T.CLIP_VISION,)
    assert _encoders(FusionMode.INTERLEAVED) == (T.CLIP_VISION, T.DINOV2_VISION)
