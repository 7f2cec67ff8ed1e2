"""Profiles: the one home of "which models, at which sizes, from where".

A profile names three checkpoint sources (a CLIP model, a DINOv2 model and a LLaVA-format
checkpoint holding the language model and the projectors) and the serving settings that go
with them. ``tiny``, ``small`` and ``paper-shaped`` are *seeded*: their checkpoints are built
from configs of the real architectures (small ones, or for ``paper-shaped`` exactly the paper's
shapes with a shallower LM), saved in the real formats and then loaded back through the same code
that loads ``paper``'s real checkpoints, so there is one loading path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VisionSpec:
    """Size of a seeded ViT; ``native_image_size`` sets its position-embedding grid."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    native_image_size: int
    projection_dim: int = 0  # CLIP only: size of ``image_embeds``


@dataclass(frozen=True)
class LanguageSpec:
    """Size of a seeded LLaMA-family causal LM."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6  # LlamaConfig's default; LLaMA-2 and LLaVA-1.5 use 1e-5
    # dtype of the saved weights: "bfloat16" draws them straight in bf16 on a meta-initialised
    # model (a 7B-wide LM builds in seconds instead of a minute of fp32 init and a 2x larger file)
    dtype: str = "float32"


@dataclass(frozen=True)
class TextSpec:
    """Size of a seeded CLIP text tower (OpenAI's ViT-L/14 text tower is 768 wide, 12 layers)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int


# SeededSpec.tokenizer values: the LLM tokenizer a seeded LLaVA folder ships
BYTE_LEVEL_BPE = "byte-level-bpe"  # trained by `tokenizers` on a tiny corpus (tiny, small)
LLAMA_SENTENCEPIECE = "llama-sentencepiece"  # LLaMA's SentencePiece settings (core/assets/llama_sp)


@dataclass(frozen=True)
class SeededSpec:
    """How to build a profile's checkpoints from random weights (no download)."""

    seed: int
    clip: VisionSpec
    dino: VisionSpec
    llm: LanguageSpec
    clip_text: TextSpec | None = None  # None: the CLIP vision spec's sizes and the LM's vocabulary
    tokenizer: str = BYTE_LEVEL_BPE


@dataclass(frozen=True)
class Sources:
    """Where a profile's checkpoints come from: local folders or HF hub ids in the HF cache."""

    clip: str
    dinov2: str
    llava: str


@dataclass(frozen=True)
class ServingSpec:
    """Triton settings of a profile's repository (instances, batching, runtime)."""

    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 2000
    encoder_instances: int = 1
    preprocess_instances: int = 2
    # Encoders on the cpu target: OpenVINO with a bf16 hint ran both ViT-B/14 encoders 1.8-2.2x
    # faster than ONNX Runtime fp32 at min token cosine 0.99996 (docs/benchmarks.md); export gates it
    # at cosine >= 0.999 against PyTorch fp32. "onnxruntime" serves exact fp32.
    runtime: str = "openvino"
    intra_op_threads: int = 0  # 0: the runtime's default (all cores)
    feature_cache_mb: int = 256  # per encoder instance; a seen image skips the encoder (0: off)
    llm_threads: int = 0  # torch intra-op threads of the LM (0: torch's default, all cores)
    llm_dtype: str = "float32"  # "bfloat16" halves the memory of a 7B/13B LM on CPU
    # In-flight batching (core.llm_engine): sequences sharing each decode step (1: one at a time)
    # and the KV pool split over them (0: each slot holds the model's context).
    llm_max_sequences: int = 8
    llm_kv_cache_mb: int = 0
    max_new_tokens: int = 128  # default answer length (MMVP answers are short)
    max_new_tokens_limit: int = 512  # a request asking for more fails (INVALID_ARG)


@dataclass(frozen=True)
class Profile:
    name: str
    image_size: int
    patch_size: int
    default_alpha: float
    sources: Sources
    seeded: SeededSpec | None = None
    aspect: str = "crop"  # "crop": resize + centre crop (CLIP processor); "pad": LLaVA-1.5 expand2square
    dino_normalisation: str = "clip"  # "clip": DINOv2 sees the CLIP tensor (the paper); "imagenet"
    serving: ServingSpec = field(default_factory=ServingSpec)
    description: str = ""

    @property
    def random_weights(self) -> bool:
        """Answers from a seeded profile are not meaningful; every output must say so."""
        return self.seeded is not None

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def with_sources(self, **overrides: str | None) -> Profile:
        """A copy whose sources are replaced where ``overrides`` gives a value."""
        given = {k: v for k, v in overrides.items() if v}
        return replace(self, sources=replace(self.sources, **given)) if given else self


def _seeded_sources(name: str, folder: str | None = None) -> Sources:
    base = artifacts_dir() / "checkpoints" / (folder or name)
    return Sources(clip=str(base / "clip"), dinov2=str(base / "dinov2"), llava=str(base / "llava"))


def artifacts_dir() -> Path:
    """Root of built artefacts (checkpoints, ONNX graphs, repositories); git never sees it."""
    return Path(os.environ.get("MOFSERVE_HOME", Path.home() / ".cache" / "mofserve")).expanduser()


def _tiny() -> Profile:
    return Profile(
        name="tiny",
        image_size=224,
        patch_size=14,
        default_alpha=0.75,
        sources=_seeded_sources("tiny"),
        seeded=SeededSpec(
            seed=0,
            # DINOv2's native grid (70px = 5x5) differs from the serving size, so the tiny
            # profile exercises the same position-embedding interpolation as dinov2-large.
            clip=VisionSpec(32, 2, 4, 64, native_image_size=224, projection_dim=24),
            dino=VisionSpec(32, 2, 4, 64, native_image_size=70),
            llm=LanguageSpec(64, 2, 4, 2, 128, vocab_size=512, max_position_embeddings=2048),
        ),
        # llm_threads=1: a 64-wide LM gains nothing from intra-op threads, and with one it does not
        # collapse (OpenMP spinning, 10x slower measured) when the CPUs are shared with other work
        # onnxruntime fp32: the tests hold the served tokens to fp32 parity with PyTorch;
        # one intra-op thread: 32-wide models gain nothing from more and suffer on shared CPUs
        serving=ServingSpec(max_batch_size=8, preferred_batch_sizes=(4, 8), preprocess_instances=1,
                            runtime="onnxruntime", intra_op_threads=1,
                            max_new_tokens=16, llm_threads=1),
        description="seeded random weights, small configs of the real architectures (tests, demo)",
    )


def _small() -> Profile:
    return Profile(
        name="small",
        image_size=224,
        patch_size=14,
        default_alpha=0.75,
        sources=_seeded_sources("small"),
        seeded=SeededSpec(
            seed=0,
            clip=VisionSpec(768, 12, 12, 3072, native_image_size=224, projection_dim=512),
            dino=VisionSpec(768, 12, 12, 3072, native_image_size=518),
            llm=LanguageSpec(512, 4, 8, 8, 1376, vocab_size=2048, max_position_embeddings=2048),
        ),
        # bf16 LM: the LM step is what a second fusion mode pays (encoders come from the feature
        # cache); in-process 8-token answers after 512 visual tokens ran ~1.6x faster than fp32 here
        serving=ServingSpec(llm_dtype="bfloat16"),
        description="seeded random ViT-B/14-sized encoders and a small LM (CPU benchmarks)",
    )


def _paper() -> Profile:
    return Profile(
        name="paper",
        image_size=336,
        patch_size=14,
        default_alpha=0.75,
        sources=Sources(
            clip=os.environ.get("MOFSERVE_CLIP", "openai/clip-vit-large-patch14-336"),
            dinov2=os.environ.get("MOFSERVE_DINOV2", "facebook/dinov2-large"),
            llava=os.environ.get("MOFSERVE_LLAVA", "MMVP/MoF_Models"),
        ),
        serving=ServingSpec(max_batch_size=8, preferred_batch_sizes=(8,), max_queue_delay_us=5000,
                            llm_dtype="bfloat16"),
        description="the paper's checkpoints (CLIP ViT-L/14-336, DINOv2 ViT-L/14, I-MoF LLaVA-1.5)",
    )


PAPER_SHAPED_LLM_LAYERS_ENV = "MOFSERVE_PAPER_SHAPED_LLM_LAYERS"
PAPER_SHAPED_LLM_LAYERS = 2  # default depth: a 7B-wide LM that 2 CPU cores still serve
LLAMA_7B_LAYERS = 32


def paper_shaped_llm_layers() -> int:
    """The paper-shaped LM's depth: ``MOFSERVE_PAPER_SHAPED_LLM_LAYERS`` (1..32), default 2."""
    raw = os.environ.get(PAPER_SHAPED_LLM_LAYERS_ENV, "").strip()
    if not raw:
        return PAPER_SHAPED_LLM_LAYERS
    try:
        layers = int(raw)
    except ValueError:
        layers = 0
    if not 1 <= layers <= LLAMA_7B_LAYERS:
        raise ValueError(f"{PAPER_SHAPED_LLM_LAYERS_ENV}: expected an integer within [1, {LLAMA_7B_LAYERS}] "
                         f"(the LM's layers; {LLAMA_7B_LAYERS} is LLaMA-7B's depth), got {raw!r}")
    return layers


def _paper_shaped() -> Profile:
    layers = paper_shaped_llm_layers()
    return Profile(
        name="paper-shaped",
        image_size=336,
        patch_size=14,
        default_alpha=0.75,
        # one folder per LM depth, so that two depths never overwrite each other's checkpoints
        sources=_seeded_sources("paper-shaped", folder=f"paper-shaped-llm{layers}"),
        seeded=SeededSpec(
            seed=0,
            # openai/clip-vit-large-patch14-336: ViT-L/14 at 336, text tower 768 x 12, 49408 ids
            clip=VisionSpec(1024, 24, 16, 4096, native_image_size=336, projection_dim=768),
            clip_text=TextSpec(768, 12, 12, 3072, vocab_size=49408),
            # facebook/dinov2-large: native 518 (37x37 grid), interpolated to 24x24 like the paper's
            dino=VisionSpec(1024, 24, 16, 4096, native_image_size=518),
            # LLaVA-1.5-7B's LLaMA (Vicuna-7B v1.5) at a configurable depth
            llm=LanguageSpec(4096, layers, 32, 32, 11008, vocab_size=32000, max_position_embeddings=4096,
                             rms_norm_eps=1e-5, dtype="bfloat16"),
            tokenizer=LLAMA_SENTENCEPIECE,
        ),
        serving=ServingSpec(max_batch_size=8, preferred_batch_sizes=(8,), max_queue_delay_us=5000,
                            runtime="openvino", llm_dtype="bfloat16", max_new_tokens=32),
        description=f"seeded random weights in exactly the paper's shapes (CLIP ViT-L/14-336, DINOv2 "
                    f"ViT-L/14, mlp2x_gelu 1024->4096, a 7B-wide LLaMA with {layers} of its 32 layers)",
    )


PROFILE_NAMES = ("tiny", "small", "paper", "paper-shaped")


def get_profile(name: str) -> Profile:
    """The named profile; sources are resolved lazily so MOFSERVE_HOME can change in tests."""
    builders = {"tiny": _tiny, "small": _small, "paper": _paper, "paper-shaped": _paper_shaped}
    if name not in builders:
        raise ValueError(f"profile: unknown profile {name!r}; expected one of {', '.join(PROFILE_NAMES)}")
    return builders[name]()
