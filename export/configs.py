"""One small export config per encoder graph (in the spirit of optimum's ONNX configs): the two
vision towers and CLIP's text tower.

Each config says which checkpoint it loads, which module is traced (a thin wrapper that emits
exactly the paper's features), and the graph's input/output names, which are the tensor
contract's names so the same graph serves the python backend and Triton's native ONNX backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mofserve.core import tensors as T
from mofserve.core.checkpoints import CheckpointPaths, load_clip_text, load_clip_vision, load_dinov2
from mofserve.core.profiles import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, Profile


class ClipVisionFeatures(nn.Module):
    """CLIP patch features from ``hidden_states[-2]`` (CLS dropped) and the pooled ``image_embeds``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[-2][:, 1:, :], out.image_embeds


class Dinov2Features(nn.Module):
    """DINOv2 patch features from the last block BEFORE the final LayerNorm (HF ``hidden_states[-1]``,
    the official ``x_prenorm``), CLS and register tokens dropped, and the normed CLS embedding.

    The position embeddings are interpolated once, at the export resolution, and baked in as a
    constant: the graph then holds no bicubic Resize (a known TensorRT export problem) and its
    numbers equal PyTorch's run-time interpolation at that size. ``renormalise`` turns the CLIP-
    normalised input into ImageNet normalisation inside the graph, for profiles that ask for it.
    """

    def __init__(self, model: nn.Module, image_size: int, renormalise: bool = False) -> None:
        super().__init__()
        self.model = model
        self.skip = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        embeddings = model.embeddings
        grid = image_size // model.config.patch_size
        with torch.no_grad():
            dummy = torch.zeros(1, grid * grid + 1, model.config.hidden_size)
            frozen = embeddings.interpolate_pos_encoding(dummy, image_size, image_size).detach().clone()
        self.register_buffer("frozen_position_embeddings", frozen, persistent=False)
        embeddings.interpolate_pos_encoding = self._frozen_position_embeddings
        self.renormalise = renormalise
        clip_mean, clip_std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        net_mean, net_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # x_imagenet = (x_clip * clip_std + clip_mean - net_mean) / net_std = x_clip * scale + shift
        self.register_buffer("scale", (clip_std / net_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((clip_mean - net_mean) / net_std).view(1, 3, 1, 1), persistent=False)

    def _frozen_position_embeddings(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.frozen_position_embeddings.to(embeddings.dtype)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.renormalise:
            pixel_values = pixel_values * self.scale + self.shift
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[-1][:, self.skip:, :], out.pooler_output


@dataclass(frozen=True)
class VisionExportConfig:
    """What one vision tower's ONNX graph is: model name, checkpoint, wrapper, tensor names."""

    model_name: str
    checkpoint_field: str  # attribute of CheckpointPaths
    input_name: str
    output_names: tuple[str, str]

    def checkpoint(self, paths: CheckpointPaths) -> Path:
        return getattr(paths, self.checkpoint_field)

    def build_module(self, paths: CheckpointPaths, profile: Profile) -> nn.Module:
        if self.model_name == T.CLIP_VISION:
            return ClipVisionFeatures(load_clip_vision(paths.clip)).eval()
        return Dinov2Features(load_dinov2(paths.dinov2), profile.image_size,
                              renormalise=profile.dino_normalisation == "imagenet").eval()

    def skip_reason(self, paths: CheckpointPaths) -> str | None:
        """Why this graph is not exported for these checkpoints (None: it is)."""
        return None

    def example(self, module: nn.Module, profile: Profile) -> torch.Tensor:
        """The tracing input (batch 1; the batch axis is exported dynamic)."""
        return torch.zeros(1, 3, profile.image_size, profile.image_size)

    def settings(self, profile: Profile) -> dict:
        """Everything besides the checkpoint that changes the graph (part of the cache key)."""
        settings = {"model": self.model_name, "image_size": profile.image_size,
                    "serving_runtime": profile.serving.runtime}
        if self.model_name == T.DINOV2_VISION:
            settings["dino_normalisation"] = profile.dino_normalisation
        return settings


CLIP_VISION_EXPORT = VisionExportConfig(T.CLIP_VISION, "clip", T.PIXEL_VALUES, (T.CLIP_FEATURES, T.CLIP_EMBEDS))
DINOV2_VISION_EXPORT = VisionExportConfig(T.DINOV2_VISION, "dinov2", T.PIXEL_VALUES, (T.DINO_FEATURES, T.DINO_CLS))
VISION_EXPORTS = (CLIP_VISION_EXPORT, DINOV2_VISION_EXPORT)


class ClipTextEmbeds(nn.Module):
    """CLIP's ``text_embeds`` (``CLIPTextModelWithProjection``) from token ids padded to the context.

    No attention mask: CLIP's text tower is causal and pools at the end-of-text position, so the
    padding after it cannot change the result (as in OpenAI's ``clip.tokenize`` + ``encode_text``).
    The pooled position is the one HF picks, traced into the graph: ``argmax(input_ids)`` for
    OpenAI's configs (``eos_token_id == 2``; end-of-text is the highest id, the first occurrence
    wins when padding repeats it), else the first ``eos_token_id``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(input_ids=input_ids).text_embeds,)


@dataclass(frozen=True)
class TextExportConfig:
    """CLIP's text tower: INPUT_IDS [L] int64 -> TEXT_EMBEDS [E] (same interface as the vision configs)."""

    model_name: str
    checkpoint_field: str
    input_name: str
    output_names: tuple[str, ...]

    def checkpoint(self, paths: CheckpointPaths) -> Path:
        return getattr(paths, self.checkpoint_field)

    def build_module(self, paths: CheckpointPaths, profile: Profile) -> nn.Module:
        return ClipTextEmbeds(load_clip_text(self.checkpoint(paths))).eval()

    def skip_reason(self, paths: CheckpointPaths) -> str | None:
        """A vision-only CLIP checkpoint (``CLIPVisionModel``) has no text tower: it is served without
        ``embed_text``. A full ``CLIPModel`` must also hold its tokenizer (checked when exporting)."""
        from mofserve.core.checkpoints import read_config

        if "text_config" not in read_config(self.checkpoint(paths)):
            return f"{self.checkpoint(paths)} is a vision-only CLIP checkpoint (no text tower)"
        return None

    @staticmethod
    def context_length(module: nn.Module) -> int:
        return int(module.model.config.max_position_embeddings)

    def example(self, module: nn.Module, profile: Profile) -> torch.Tensor:
        return torch.zeros(1, self.context_length(module), dtype=torch.int64)

    def settings(self, profile: Profile) -> dict:
        return {"model": self.model_name, "serving_runtime": profile.serving.runtime}


CLIP_TEXT_EXPORT = TextExportConfig(T.CLIP_TEXT, "clip", T.INPUT_IDS, (T.TEXT_EMBEDS,))
ExportConfig = VisionExportConfig | TextExportConfig
EXPORTS: tuple[ExportConfig, ...] = (*VISION_EXPORTS, CLIP_TEXT_EXPORT)
