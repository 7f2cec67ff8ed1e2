"""FLOPs of a ViT image encoder, counted from its shapes (no weights, no tracing).

Only the matrix multiplies are counted, at 2 FLOPs per multiply-accumulate: the patch
embedding (a stride-``p`` convolution is a ``[P, 3p^2] x [3p^2, D]`` matmul), per layer the
QKV and output projections, the MLP (or SwiGLU FFN) and the attention scores ``Q K^T`` and
values ``A V``, and CLIP's final projection of the pooled token. LayerNorm, softmax, GELU,
biases and residual adds are left out: they are a fraction of a percent at ViT-B sizes and not
what a matmul ceiling measures. The sequence counts every token the blocks see (patches,
CLS and DINOv2 register tokens).

This is the convention of open_clip's ``profile`` and timm's tables, expressed in FLOPs
rather than MACs: ViT-B/16 at 224px is 17.6 GMACs = 35.1 GFLOPs per image, ViT-L/14 at 336px
is 191 GMACs = 382 GFLOPs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class VitShape:
    """What the FLOP count of one ViT forward pass depends on."""

    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    extra_tokens: int = 1  # CLS plus register tokens
    projection_dim: int = 0  # CLIP's visual projection of the pooled token (0: none)
    channels: int = 3
    swiglu: bool = False  # DINOv2-giant's SwiGLU FFN: three matmuls instead of two

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        return self.num_patches + self.extra_tokens


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
    """Hidden width of HF/DINOv2's SwiGLU FFN: 2/3 of ``hidden * mlp_ratio``, rounded up to 8."""
    return (int(int(hidden_size * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def vit_shape_from_config(config: Any, image_size: int) -> VitShape:
    """The shape of a HF CLIP vision or DINOv2 config (object or dict), run at ``image_size``.

    A CLIP ``vision_config`` carries ``intermediate_size`` and ``projection_dim``; a DINOv2
    config carries ``mlp_ratio``, ``num_register_tokens`` and ``use_swiglu_ffn``.
    """
    config = _get(config, "vision_config", None) or config
    hidden = int(_get(config, "hidden_size"))
    swiglu = bool(_get(config, "use_swiglu_ffn", False))
    intermediate = _get(config, "intermediate_size", None)
    if intermediate is None:
        ratio = float(_get(config, "mlp_ratio", 4))
        intermediate = swiglu_hidden(hidden, ratio) if swiglu else int(hidden * ratio)
    return VitShape(
        image_size=image_size,
        patch_size=int(_get(config, "patch_size")),
        hidden_size=hidden,
        num_layers=int(_get(config, "num_hidden_layers")),
        intermediate_size=int(intermediate),
        extra_tokens=1 + int(_get(config, "num_register_tokens", 0) or 0),
        projection_dim=int(_get(config, "projection_dim", 0) or 0),
        channels=int(_get(config, "num_channels", 3) or 3),
        swiglu=swiglu,
    )


def vit_macs_breakdown(shape: VitShape) -> dict[str, int]:
    """Multiply-accumulates per image, by part."""
    n, d, i = shape.tokens, shape.hidden_size, shape.intermediate_size
    ffn = 3 * n * d * i if shape.swiglu else 2 * n * d * i
    return {
        "patch_embed": shape.num_patches * shape.channels * shape.patch_size**2 * d,
        "qkv": shape.num_layers * 3 * n * d * d,
        "attn_scores": shape.num_layers * n * n * d,
        "attn_values": shape.num_layers * n * n * d,
        "attn_proj": shape.num_layers * n * d * d,
        "mlp": shape.num_layers * ffn,
        "projection": d * shape.projection_dim,
    }


def vit_macs(shape: VitShape) -> int:
    return sum(vit_macs_breakdown(shape).values())


def vit_flops(shape: VitShape) -> int:
    """FLOPs per image (2 per multiply-accumulate)."""
    return 2 * vit_macs(shape)
