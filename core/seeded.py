"""Seeded checkpoints: small configs of the REAL architectures with random weights.

They are written in the same formats as the real checkpoints (a ``CLIPModel`` folder, a
``Dinov2Model`` folder, a LLaVA-format folder with LLaMA weights, ``mm_projector`` and
``dino_mm_projector`` keys in safetensors, and a tokenizer trained offline) so that they load
through ``core.checkpoints`` exactly like ``paper``'s. Answers from them are not meaningful.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from .checkpoints import CLIP_PROJECTOR_PREFIX, DINO_PROJECTOR_PREFIX
from .fusion import PROJECTOR_TYPE, Projector
from .profiles import CLIP_MEAN, CLIP_STD, Profile, SeededSpec

MARKER = ".mofserve-seeded.json"
_FORMAT_VERSION = 1


def _spec_digest(profile: Profile) -> str:
    assert profile.seeded is not None
    payload = {"v": _FORMAT_VERSION, "spec": asdict(profile.seeded), "image_size": profile.image_size,
               "patch_size": profile.patch_size, "aspect": profile.aspect}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def ensure_seeded_checkpoints(profile: Profile) -> None:
    """Build the profile's checkpoints unless folders with the same spec digest already exist."""
    digest = _spec_digest(profile)
    dirs = [Path(profile.sources.clip), Path(profile.sources.dinov2), Path(profile.sources.llava)]
    if all(_marker_matches(d, digest) for d in dirs):
        return
    build_seeded_checkpoints(profile, *dirs)
    for d in dirs:
        (d / MARKER).write_text(json.dumps({"profile": profile.name, "digest": digest}))


def _marker_matches(folder: Path, digest: str) -> bool:
    marker = folder / MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("digest") == digest


def build_seeded_checkpoints(profile: Profile, clip_dir: Path, dino_dir: Path, llava_dir: Path) -> None:
    spec = profile.seeded
    assert spec is not None, f"profile {profile.name} is not seeded"
    torch.manual_seed(spec.seed)
    for d in (clip_dir, dino_dir, llava_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    _build_clip(spec, profile, clip_dir)
    _build_dinov2(spec, profile, dino_dir)
    _build_llava(spec, profile, llava_dir)


def _build_clip(spec: SeededSpec, profile: Profile, out: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    v = spec.clip
    config = CLIPConfig(
        vision_config=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                           image_size=v.native_image_size, patch_size=profile.patch_size,
                           projection_dim=v.projection_dim),
        text_config=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                         num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                         vocab_size=spec.llm.vocab_size, max_position_embeddings=77,
                         projection_dim=v.projection_dim),
        projection_dim=v.projection_dim,
    )
    CLIPModel(config).eval().save_pretrained(out)
    CLIPImageProcessorPil(
        size={"shortest_edge": profile.image_size},
        crop_size={"height": profile.image_size, "width": profile.image_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    ).save_pretrained(out)


def _build_dinov2(spec: SeededSpec, profile: Profile, out: Path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    v = spec.dino
    config = Dinov2Config(hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
                          num_attention_heads=v.num_heads, mlp_ratio=v.intermediate_size // v.hidden_size,
                          image_size=v.native_image_size, patch_size=profile.patch_size)
    Dinov2Model(config).eval().save_pretrained(out)


# A small corpus in the shape of what the LLM will read: the LLaVA v1 template and MMVP questions.
_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
    "USER: <image>\nIs the dog facing left or right from the camera's perspective? (a) Left (b) Right "
    "ASSISTANT: (a) Left",
    "USER: Are the butterfly's wings closer to being open or closed? (a) Open (b) Closed ASSISTANT: (b)",
    "Is the elderly person standing or sitting in the picture? (a) Standing (b) Sitting",
    "How many eyes can you see in the image? (a) One (b) Two. Is there a shadow on the flower?",
    "What color is the text on the sign? (a) Red (b) Blue. Is the door of the truck open or closed?",
    "Are there any words displayed on the vehicle's lightbar? (a) Yes (b) No. In the image, is the "
    "flame of the match more towards the left or right?",
    "0 1 2 3 4 5 6 7 8 9 yes no left right up down top bottom front back open closed one two three",
]


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>", model_max_length=2048)


def _build_llava(spec: SeededSpec, profile: Profile, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer(spec.llm.vocab_size)
    m = spec.llm
    llama = LlamaConfig(hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                        num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                        intermediate_size=m.intermediate_size, vocab_size=len(tokenizer),
                        max_position_embeddings=m.max_position_embeddings,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(llama).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for prefix, width in ((CLIP_PROJECTOR_PREFIX, spec.clip.hidden_size),
                          (DINO_PROJECTOR_PREFIX, spec.dino.hidden_size)):
        projector = Projector(width, m.hidden_size)
        for key, value in projector.state_dict().items():
            state[prefix + key] = value.contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = llama.to_dict()
    config.update(
        architectures=["LlavaLlamaForCausalLM"], model_type="llava",
        mm_hidden_size=spec.clip.hidden_size, mm_projector_type=PROJECTOR_TYPE,
        mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_vision_tower=str(profile.sources.clip), dino_vision_tower=str(profile.sources.dinov2),
        image_aspect_ratio=profile.aspect, mm_use_im_start_end=False, mm_use_im_patch_token=False,
        mofserve_seeded=True,
    )
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(out)
