"""Independent reference implementations used by the tests.

Written from the paper's formulas with numpy and plain transformers calls, sharing no code
with ``mofserve.core.fusion`` or the export wrappers, so that a bug there cannot hide itself.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf


def mlp2x_gelu(x: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
    """LLaVA's projector: Linear, exact GELU, Linear (weights as [out, in])."""
    h = x.astype(np.float64) @ state["0.weight"].T.astype(np.float64) + state["0.bias"]
    h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
    return h @ state["2.weight"].T.astype(np.float64) + state["2.bias"]


def fuse(mode: str, clip: np.ndarray, dino: np.ndarray, p_clip: dict, p_dino: dict,
         alpha: float | None = None, p_add: dict | None = None) -> np.ndarray:
    """The four modes of the paper on [P, D] features (one image) -> [N, H]."""
    if mode == "clip":
        return mlp2x_gelu(clip, p_clip)
    if mode == "dinov2":
        return mlp2x_gelu(dino, p_dino)
    if mode == "additive":
        return mlp2x_gelu((1 - alpha) * clip.astype(np.float64) + alpha * dino, p_add or p_clip)
    if mode == "interleaved":
        c, d = mlp2x_gelu(clip, p_clip), mlp2x_gelu(dino, p_dino)
        out = np.empty((c.shape[0] + d.shape[0], c.shape[1]))
        out[0::2], out[1::2] = c, d
        return out
    raise ValueError(mode)


def min_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a2 = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b2 = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(np.min(np.sum(a2 * b2, 1) / (np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1))))
