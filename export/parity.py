"""Parity of an exported graph against the PyTorch module it came from.

Every export runs this on random tensors and on real photos (preprocessed by the serving
code), at two batch sizes so that the dynamic batch axis is exercised; the export fails when
a feature drifts. Cosine is taken per token row, the way the LLM sees the features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from mofserve.core.runtime import OnnxRunner


@dataclass(frozen=True)
class Tolerance:
    """Pass when min cosine >= ``min_cosine`` and, if ``rel`` is set,
    max |graph - torch| <= rel * max |torch| + abs."""

    name: str
    min_cosine: float
    rel: float | None = None
    abs: float = 0.0


# fp32 graphs must reproduce PyTorch; a bf16 serving runtime (OpenVINO on AVX512-BF16/AMX) is held
# to the cosine of the features, the accuracy gate the GPU targets use too.
FP32 = Tolerance("fp32", min_cosine=0.9999, rel=1e-3, abs=1e-4)
BF16 = Tolerance("bf16", min_cosine=0.999)
MIN_COSINE = FP32.min_cosine


class ParityError(RuntimeError):
    """An exported graph's outputs differ from PyTorch beyond the stated tolerance."""


@dataclass(frozen=True)
class OutputParity:
    name: str
    inputs: str
    max_abs_diff: float
    ref_max_abs: float
    min_cosine: float
    tolerance: Tolerance = FP32

    @property
    def ok(self) -> bool:
        t = self.tolerance
        return self.min_cosine >= t.min_cosine and (
            t.rel is None or self.max_abs_diff <= t.rel * self.ref_max_abs + t.abs)

    def line(self) -> str:
        flag = "ok" if self.ok else "FAIL"
        return (f"{self.tolerance.name:<4} {self.name:<14} {self.inputs:<10} max_abs_diff={self.max_abs_diff:.2e} "
                f"(ref max {self.ref_max_abs:.2f}) min_cosine={self.min_cosine:.7f} {flag}")


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows over the last axis."""
    a2 = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b2 = b.reshape(-1, b.shape[-1]).astype(np.float64)
    denom = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    return np.sum(a2 * b2, axis=1) / np.maximum(denom, 1e-30)


def compare(name: str, inputs: str, ref: np.ndarray, got: np.ndarray, tolerance: Tolerance = FP32) -> OutputParity:
    if ref.shape != got.shape:
        raise ParityError(f"{name}: shape {got.shape} from the graph, {ref.shape} from PyTorch ({inputs})")
    return OutputParity(name, inputs, float(np.max(np.abs(ref - got))), float(np.max(np.abs(ref))),
                        float(np.min(row_cosines(ref, got))), tolerance)


def check_parity(module: nn.Module, runner: OnnxRunner, input_name: str, output_names: Sequence[str],
                 batches: dict[str, np.ndarray], tolerance: Tolerance = FP32) -> list[OutputParity]:
    """Compare every output on every named batch; raise ParityError listing the failures."""
    results: list[OutputParity] = []
    for label, batch in batches.items():
        with torch.inference_mode():
            ref = module(torch.from_numpy(batch))
        got = runner.run({input_name: batch})
        for name, ref_out in zip(output_names, ref, strict=True):
            results.append(compare(name, label, ref_out.float().numpy(), got[name], tolerance))
    failed = [r for r in results if not r.ok]
    if failed:
        raise ParityError(f"parity against PyTorch failed ({runner.runtime} {runner.precision}, "
                          f"{tolerance.name} tolerance):\n" + "\n".join(r.line() for r in failed))
    return results


def summarise(results: Sequence[OutputParity]) -> dict:
    return {"min_cosine": min(r.min_cosine for r in results),
            "max_abs_diff": max(r.max_abs_diff for r in results),
            "checks": [asdict(r) for r in results]}
