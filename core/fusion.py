"""Mixture-of-Features maths: the one implementation of the four fusion modes.

- ``clip``:        P_clip(clip)                          (LLaVA-1.5 baseline)
- ``dinov2``:      P_dino(dino)
- ``additive``:    P_add((1 - a) * clip + a * dino)      (A-MoF; mixed BEFORE the projector)
- ``interleaved``: out[0::2] = P_clip(clip), out[1::2] = P_dino(dino)   (I-MoF, 2N tokens)

Projectors are LLaVA's ``mlp2x_gelu``: Linear(D -> H), GELU (exact, erf), Linear(H -> H).
No A-MoF weights were released, so ``additive`` uses a checkpoint's
``additive_mm_projector`` when it has one and the CLIP projector otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .tensors import FusionMode

# Where a LLaVA-format checkpoint keeps each projector's weights. Exact prefixes: a substring match
# on "mm_projector" would also catch the DINOv2 projector's keys (PAPER.md).
CLIP_PROJECTOR_PREFIX = "model.mm_projector."
DINO_PROJECTOR_PREFIX = "model.dino_mm_projector."
ADDITIVE_PROJECTOR_PREFIX = "model.additive_mm_projector."

PROJECTOR_TYPE = "mlp2x_gelu"


class Projector(nn.Sequential):
    """LLaVA's mlp2x_gelu; its state-dict keys (``0.*``, ``2.*``) match LLaVA checkpoints."""

    def __init__(self, in_features: int, hidden_size: int) -> None:
        super().__init__(nn.Linear(in_features, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> Projector:
        weight = state["0.weight"]
        projector = cls(weight.shape[1], weight.shape[0])
        projector.load_state_dict({k: v.float() for k, v in state.items()})
        return projector.eval()


def check_alpha(alpha: float) -> float:
    """A-MoF's DINOv2 proportion; anything outside [0, 1] (or NaN) is a caller error."""
    a = float(alpha)
    if math.isnan(a) or not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha: must be within [0, 1] (the DINOv2 proportion of A-MoF), got {alpha!r}")
    return a


def alpha_column(values: Sequence[float] | None, rows: int, default: float) -> list[float]:
    """One checked alpha per batch row of a request: its ``ALPHA`` values (one per row, or one for
    every row), or the profile's default when the request has none."""
    if values is None or len(values) == 0:
        return [check_alpha(default)] * rows
    checked = [check_alpha(v) for v in values]
    if len(checked) not in (1, rows):
        raise ValueError(f"alpha: expected one value per batch row ({rows}) or one for all, got {len(checked)}")
    return checked if len(checked) == rows else checked * rows


class Fuser(nn.Module):
    """Turns CLIP and DINOv2 patch features ``[B, P, D]`` into visual tokens ``[B, N, H]``."""

    def __init__(self, clip_projector: Projector, dino_projector: Projector,
                 additive_projector: Projector | None = None) -> None:
        super().__init__()
        self.clip_projector = clip_projector
        self.dino_projector = dino_projector
        self.additive_projector = additive_projector or clip_projector

    @torch.inference_mode()
    def forward(self, mode: FusionMode | str, clip: torch.Tensor, dino: torch.Tensor,
                alpha: torch.Tensor | float | None = None) -> torch.Tensor:
        mode = FusionMode.parse(str(mode))
        if mode is FusionMode.CLIP:
            return self.clip_projector(clip)
        if mode is FusionMode.DINOV2:
            return self.dino_projector(dino)
        if mode is FusionMode.ADDITIVE:
            if alpha is None:
                raise ValueError("alpha: required for the additive mode")
            a = torch.as_tensor(alpha, dtype=clip.dtype).reshape(-1, 1, 1)
            return self.additive_projector((1 - a) * clip + a * dino)
        c, d = self.clip_projector(clip), self.dino_projector(dino)
        # stack on a new axis after the token axis, then flatten: c0, d0, c1, d1, ...
        return torch.stack((c, d), dim=2).flatten(1, 2)
