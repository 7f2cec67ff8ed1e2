"""Checkpoint loading: the one path by which every profile's weights enter the process.

Sources are local folders or HF hub ids already in the HF cache; nothing is downloaded. A
LLaVA-format checkpoint is a folder with a LLaVA ``config.json`` (LLaMA fields plus ``mm_*``),
a tokenizer, and weights in safetensors (sharded or not) or ``pytorch_model*.bin`` (read with
``torch.load(weights_only=True)``, never unpickled blindly). Its projector keys are
``model.mm_projector.*`` (CLIP) and ``model.dino_mm_projector.*`` (DINOv2): matched by exact
prefix, since a substring match on "mm_projector" also catches the DINOv2 keys. The LLaMA of
the same folder is loaded by ``core.language_model.load_language_model``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .fusion import (
    ADDITIVE_PROJECTOR_PREFIX,
    CLIP_PROJECTOR_PREFIX,
    DINO_PROJECTOR_PREFIX,
    PROJECTOR_TYPE,
    Fuser,
    Projector,
)
from .profiles import Profile
from .seeded import ensure_seeded_checkpoints


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint source is neither a folder nor in the HF cache; the message says what to pass."""


@dataclass(frozen=True)
class CheckpointPaths:
    clip: Path
    dinov2: Path
    llava: Path


_FLAGS = {"clip": ("--clip", "MOFSERVE_CLIP"), "dinov2": ("--dinov2", "MOFSERVE_DINOV2"),
          "llava": ("--llava", "MOFSERVE_LLAVA")}


def resolve_source(source: str, what: str) -> Path:
    """A local folder holding ``config.json``, or the HF-cache snapshot of a hub id."""
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        return path
    if not path.exists() and source.count("/") == 1 and not source.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            snapshot = Path(snapshot_download(source, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            snapshot = None
        if snapshot is not None and (snapshot / "config.json").is_file():
            return snapshot
    flag, env = _FLAGS.get(what, ("--" + what, "MOFSERVE_" + what.upper()))
    from huggingface_hub.constants import HF_HUB_CACHE

    raise CheckpointNotFoundError(
        f"{what}: checkpoint {source!r} was not found as a local folder with config.json nor in the "
        f"HF cache ({HF_HUB_CACHE}); mofserve never downloads weights. Pass {flag} PATH (or set {env}) "
        f"to a checkpoint folder, or fetch it once with `huggingface-cli download {source}`."
    )


def resolve_profile(profile: Profile, build_seeded: bool = True) -> CheckpointPaths:
    """Checkpoint folders of a profile; seeded profiles are built (once) on first use."""
    if profile.seeded is not None and build_seeded:
        ensure_seeded_checkpoints(profile)
    return CheckpointPaths(
        clip=resolve_source(profile.sources.clip, "clip"),
        dinov2=resolve_source(profile.sources.dinov2, "dinov2"),
        llava=resolve_source(profile.sources.llava, "llava"),
    )


def quiet_transformers() -> None:
    """Loading a CLIPModel checkpoint into its vision tower lists every text weight as
    "unexpected" and draws progress bars: noise in server logs, so keep errors only."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_clip_vision(path: Path):
    """CLIP vision tower with its projection; works on full CLIPModel checkpoints too."""
    from transformers import CLIPVisionModelWithProjection

    quiet_transformers()
    return CLIPVisionModelWithProjection.from_pretrained(path, dtype=torch.float32).eval()


def load_clip_text(path: Path):
    """CLIP text tower with its projection (``text_embeds``, the space of ``image_embeds``); needs a
    full ``CLIPModel`` checkpoint. Eager attention: the exported graph then holds plain MatMul/Softmax
    with CLIP's causal mask as a constant (the context length is fixed)."""
    from transformers import CLIPTextModelWithProjection

    quiet_transformers()
    return CLIPTextModelWithProjection.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def read_logit_scale(path: Path) -> float:
    """CLIP's trained temperature ``exp(logit_scale)`` (100.0 for OpenAI's checkpoints): its
    similarity logits are ``logit_scale.exp() * cosine(text, image)``. Read from the weights; the
    config only has the initial value."""
    import math

    for key, value in iter_tensors(Path(path), ("logit_scale",)):
        if key == "logit_scale":
            return math.exp(float(value.float().reshape(-1)[0]))
    raise ValueError(f"clip: {path} has no logit_scale weight; the text tower needs a full CLIPModel checkpoint")


def load_dinov2(path: Path):
    from transformers import Dinov2Model

    quiet_transformers()
    return Dinov2Model.from_pretrained(path, dtype=torch.float32).eval()


def read_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def _weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / n for n in names]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointNotFoundError(f"llava: no *.safetensors or pytorch_model*.bin weights in {path}")
    return files


def iter_tensors(path: Path, prefixes: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors whose key starts with one of ``prefixes``, reading only those from safetensors."""
    prefixes = tuple(prefixes)
    for file in _weight_files(Path(path)):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if key.startswith(prefixes):
                        yield key, f.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for key, value in state.items():
                if key.startswith(prefixes):
                    yield key, value


def load_projectors(path: Path) -> dict[str, Projector]:
    """The projectors of a LLaVA-format checkpoint: ``clip``, ``dinov2`` and, if present, ``additive``."""
    config = read_config(path)
    kind = config.get("mm_projector_type", PROJECTOR_TYPE)
    if kind != PROJECTOR_TYPE:
        raise ValueError(f"llava: mm_projector_type {kind!r} is not supported; expected {PROJECTOR_TYPE!r}")
    prefixes = {"clip": CLIP_PROJECTOR_PREFIX, "dinov2": DINO_PROJECTOR_PREFIX,
                "additive": ADDITIVE_PROJECTOR_PREFIX}
    grouped: dict[str, dict[str, torch.Tensor]] = {name: {} for name in prefixes}
    for key, tensor in iter_tensors(path, prefixes.values()):
        for name, prefix in prefixes.items():
            if key.startswith(prefix):
                grouped[name][key[len(prefix):]] = tensor
    if not grouped["clip"]:
        raise ValueError(f"llava: {path} has no {CLIP_PROJECTOR_PREFIX}* weights")
    if not grouped["dinov2"]:
        raise ValueError(
            f"llava: {path} has no {DINO_PROJECTOR_PREFIX}* weights; the dinov2 and interleaved modes "
            "need an I-MoF checkpoint such as MMVP/MoF_Models"
        )
    return {name: Projector.from_state_dict(state) for name, state in grouped.items() if state}


def load_fuser(path: Path) -> Fuser:
    projectors = load_projectors(path)
    return Fuser(projectors["clip"], projectors["dinov2"], projectors.get("additive"))


@dataclass(frozen=True)
class ModelShapes:
    """Dimensions read from checkpoint configs (no weights loaded)."""

    image_size: int
    num_patches: int
    clip_width: int
    clip_embed_dim: int
    dino_width: int
    llm_width: int
    text_context_length: int = 77  # CLIP's text context (input ids per text)


def _vision_section(config: dict) -> dict:
    return config.get("vision_config", config)


def read_shapes(paths: CheckpointPaths, profile: Profile) -> ModelShapes:
    clip_cfg, dino_cfg, llava_cfg = read_config(paths.clip), read_config(paths.dinov2), read_config(paths.llava)
    clip_vision = _vision_section(clip_cfg)
    patch = clip_vision["patch_size"]
    if dino_cfg["patch_size"] != patch or patch != profile.patch_size:
        raise ValueError(
            f"patch_size: CLIP ({patch}), DINOv2 ({dino_cfg['patch_size']}) and the profile "
            f"({profile.patch_size}) must agree so that the two token grids line up"
        )
    return ModelShapes(
        image_size=profile.image_size,
        num_patches=profile.num_patches,
        clip_width=clip_vision["hidden_size"],
        clip_embed_dim=clip_cfg.get("projection_dim", clip_vision.get("projection_dim")),
        dino_width=dino_cfg["hidden_size"],
        llm_width=llava_cfg["hidden_size"],
        text_context_length=clip_cfg.get("text_config", {}).get("max_position_embeddings", 77),
    )
