"""Tensor and model names: the contract between export, the Triton repository, the front-end
and clients. Nothing else spells these strings.

Shapes are given without the batch axis (every model here has ``max_batch_size > 0``).
``P`` is the patch count, ``Dc``/``Dd`` the CLIP/DINOv2 widths, ``E`` CLIP's projection size,
``H`` the LLM width and ``N`` the visual-token count of a fusion mode.
"""

from __future__ import annotations

from enum import StrEnum

# Inputs and outputs.
IMAGE = "IMAGE"  # TYPE_STRING [1]: encoded image bytes (JPEG, PNG, WebP, GIF, BMP, TIFF)
PIXEL_VALUES = "PIXEL_VALUES"  # FP32 [3, S, S]: CLIP-normalised pixels
CLIP_FEATURES = "CLIP_FEATURES"  # FP32 [P, Dc]: hidden_states[-2], CLS dropped
CLIP_EMBEDS = "CLIP_EMBEDS"  # FP32 [E]: pooled, projected image embedding
DINO_FEATURES = "DINO_FEATURES"  # FP32 [P, Dd]: last block before the final LayerNorm, CLS dropped
DINO_CLS = "DINO_CLS"  # FP32 [Dd]: normed CLS token (the DINOv2 image embedding)
ALPHA = "ALPHA"  # FP32 [1]: DINOv2 proportion of A-MoF, in [0, 1]; optional (profile default)
VISUAL_TOKENS = "VISUAL_TOKENS"  # FP32 [N, H]

# Models.
PREPROCESS = "preprocess"
CLIP_VISION = "clip_vision"
DINOV2_VISION = "dinov2_vision"
EMBED = "embed"

# ---- CLIP text tower (MMVP-VLM: text embeddings in the space of CLIP_EMBEDS) -------------
TEXT = "TEXT"  # TYPE_STRING [1]: UTF-8 text (the evaluator sends "a photo of " + statement)
INPUT_IDS = "INPUT_IDS"  # INT64 [L]: CLIP token ids, <|startoftext|> ... <|endoftext|>, padded/truncated to L=77
TEXT_EMBEDS = "TEXT_EMBEDS"  # FP32 [E]: CLIPTextModelWithProjection.text_embeds (same space as CLIP_EMBEDS)
TOKENIZE_TEXT = "tokenize_text"  # TEXT -> INPUT_IDS with the CLIP checkpoint's own tokenizer
CLIP_TEXT = "clip_text"  # INPUT_IDS -> TEXT_EMBEDS (the exported text tower)
EMBED_TEXT = "embed_text"  # ensemble TEXT -> TEXT_EMBEDS
LOGIT_SCALE_PARAMETER = "logit_scale"  # embed_text config parameter: exp(logit_scale) of the checkpoint


class FusionMode(StrEnum):
    """How CLIP and DINOv2 features become the LLM's visual tokens (see core.fusion)."""

    CLIP = "clip"
    DINOV2 = "dinov2"
    ADDITIVE = "additive"
    INTERLEAVED = "interleaved"

    @classmethod
    def parse(cls, value: str) -> FusionMode:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ValueError(f"mode: unknown fusion mode {value!r}; expected one of {names}") from None


def fuse_model(mode: FusionMode | str) -> str:
    return f"fuse_{FusionMode.parse(str(mode)).value}"


def tokens_model(mode: FusionMode | str) -> str:
    """The ensemble image bytes -> visual tokens of ``mode`` (for apps with their own LLM)."""
    return f"tokens_{FusionMode.parse(str(mode)).value}"


def token_count(mode: FusionMode | str, num_patches: int) -> int:
    """Visual tokens a mode emits: interleaving doubles the patch count."""
    return 2 * num_patches if FusionMode.parse(str(mode)) is FusionMode.INTERLEAVED else num_patches


# ---- visual question answering (the `llm` model and the `vqa_<mode>` ensembles) ----------
QUESTION = "QUESTION"  # TYPE_STRING [1]: UTF-8 question
OPTIONS = "OPTIONS"  # TYPE_STRING [1], optional: MMVP-style "(a) Standing (b) Sitting"
MAX_NEW_TOKENS = "MAX_NEW_TOKENS"  # INT32 [1], optional
TEMPERATURE = "TEMPERATURE"  # FP32 [1], optional: 0 = greedy (the default)
TOP_P = "TOP_P"  # FP32 [1], optional
SEED = "SEED"  # INT64 [1], optional: makes sampling reproducible
ANSWER = "ANSWER"  # TYPE_STRING [1]: generated text
CHOSEN_OPTION = "CHOSEN_OPTION"  # TYPE_STRING [1]: option letter, e.g. "a" ("" without options)
OPTION_SCORES = "OPTION_SCORES"  # FP32 [-1]: mean log-likelihood per option token, in option order

# Per-stage wall time in milliseconds, FP32 [1], emitted by each python-backend stage so that an
# ensemble's response carries its own breakdown (an encoder answered from its feature cache
# reports ~0). Native-backend encoders (gpu-onnx, gpu-trt) emit none.
TIMING_PREPROCESS = "TIMING_PREPROCESS_MS"
TIMING_CLIP = "TIMING_CLIP_MS"
TIMING_DINOV2 = "TIMING_DINOV2_MS"
TIMING_FUSION = "TIMING_FUSION_MS"
TIMING_LLM = "TIMING_LLM_MS"
TIMING_TOKENIZE = "TIMING_TOKENIZE_MS"
TIMING_CLIP_TEXT = "TIMING_CLIP_TEXT_MS"
TIMING_PREFIX = "TIMING_"
# ENCODER_TIMINGS: emitted by the python encoders (cpu, gpu-torch); gpu-onnx / gpu-trt emit none
ENCODER_TIMINGS = {CLIP_VISION: TIMING_CLIP, DINOV2_VISION: TIMING_DINOV2, CLIP_TEXT: TIMING_CLIP_TEXT}


def is_timing(name: str) -> bool:
    """Whether a tensor is a per-stage timing (outside the contract that every target shares)."""
    return name.startswith(TIMING_PREFIX)


LLM = "llm"

# ---- the `llm` model streams (Triton decoupled mode) ---------------------------------------
# One request to `llm` (one row) gets several responses: one per decode step carrying TEXT_DELTA
# (the first also CHOSEN_OPTION, OPTION_SCORES and the queue / prefill timings), then a final one
# (Triton's COMPLETE_FINAL flag) carrying ANSWER, FINISH_REASON, the token counts and the stage's
# timings. A response may carry a subset of the outputs; readers merge them in order.
REQUEST_ID = "REQUEST_ID"  # TYPE_STRING [1], optional: the caller's id for this sequence
CANCEL = "CANCEL"  # BOOL [1], optional: with REQUEST_ID, ends that sequence (frees its batch slot)
TEXT_DELTA = "TEXT_DELTA"  # TYPE_STRING [1]: text of the tokens generated since the last response
FINISH_REASON = "FINISH_REASON"  # TYPE_STRING [1]: "stop" (EOS), "length" (token limit), "cancelled"
PROMPT_TOKENS = "PROMPT_TOKENS"  # INT32 [1]: tokens the LM read (text + visual)
COMPLETION_TOKENS = "COMPLETION_TOKENS"  # INT32 [1]: tokens the LM wrote (EOS included)
TIMING_LLM_QUEUE = "TIMING_LLM_QUEUE_MS"  # waiting for a batch slot / KV room
TIMING_PREFILL = "TIMING_PREFILL_MS"  # the prompt's forward pass (+ option scoring) and the first token
TIMING_DECODE = "TIMING_DECODE_MS"  # from the first token to the last
FINISH_REASONS = ("stop", "length", "cancelled", "error")
# Triton rejects a decoupled ensemble whose outputs come from more than its decoupled step, so in
# `vqa_<mode>` the upstream stages' timings are inputs of `llm`, which echoes them on its first
# response as one vector in this order (NaN: the mode or target has no such timing).
UPSTREAM_TIMINGS = "UPSTREAM_TIMINGS_MS"  # FP32 [4]
UPSTREAM_STAGES = ("TIMING_PREPROCESS_MS", "TIMING_CLIP_MS", "TIMING_DINOV2_MS", "TIMING_FUSION_MS")
# Errors of the `llm` model travel as data on a final response (FINISH_REASON "error"): Triton's
# streaming gRPC (ModelStreamInfer) keeps only an error's message, not its status code.
ERROR_CODE = "ERROR_CODE"  # TYPE_STRING [1]: "invalid_argument" | "resource_exhausted" | "internal"
ERROR_MESSAGE = "ERROR_MESSAGE"  # TYPE_STRING [1]: the field first, e.g. "max_new_tokens: ..."
ERROR_FIELD = "ERROR_FIELD"  # TYPE_STRING [1]: the request field at fault as data ("" for none)


def vqa_model(mode: FusionMode | str) -> str:
    """The ensemble image bytes + question -> answer with the visual tokens of ``mode``."""
    return f"vqa_{FusionMode.parse(str(mode)).value}"
