"""What the engine answers (``Answer``, ``Tokens``, ``Embeddings``, ``TextEmbeddings``), and how
the responses of a ``vqa_<mode>`` stream add up to an ``Answer``.

The ``llm`` model streams (core/tensors.py, "the `llm` model streams"): a response per decode
step with ``TEXT_DELTA`` (the first also the chosen option, the scores and the queue / prefill
timings), then a final response with the whole ``ANSWER``, ``FINISH_REASON``, the token counts
and the stage's timings, or with ``FINISH_REASON`` "error", ``ERROR_CODE`` and ``ERROR_MESSAGE``.
The upstream stages' timings come echoed by ``llm`` as one vector (``UPSTREAM_TIMINGS_MS``: a
decoupled ensemble may output only its last step's tensors). Any response may carry only some
outputs, so ``AnswerBuilder`` merges whatever it sees in order, never assuming which response
carries what. Kept apart from ``engine`` (which drives the stream: deadline,
cancellation, errors) so that both stay readable; ``engine`` re-exports these names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from mofserve.core import tensors as T
from mofserve.core.tensors import FusionMode


@dataclass
class StageTimings:
    """Milliseconds per stage; encoders run side by side, so ``encoders_ms`` is the slower one.

    ``llm_ms`` is the ``llm`` stage as the model reports it: ``llm_queue_ms`` waiting for a batch
    slot, ``prefill_ms`` the prompt (and option scoring) up to the first token, ``decode_ms`` the
    rest. ``total_ms`` and ``time_to_first_token_ms`` are measured by the front-end around the
    Triton call (what a caller waits for the whole answer, and for its first token).
    """

    preprocess_ms: float = 0.0
    clip_ms: float = 0.0
    dinov2_ms: float = 0.0
    fusion_ms: float = 0.0
    llm_ms: float = 0.0
    total_ms: float = 0.0
    llm_queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    time_to_first_token_ms: float = 0.0

    @property
    def encoders_ms(self) -> float:
        return max(self.clip_ms, self.dinov2_ms)

    def as_dict(self) -> dict[str, float]:
        return {"preprocess_ms": self.preprocess_ms, "encoders_ms": self.encoders_ms, "clip_ms": self.clip_ms,
                "dinov2_ms": self.dinov2_ms, "fusion_ms": self.fusion_ms, "llm_ms": self.llm_ms,
                "total_ms": self.total_ms, "llm_queue_ms": self.llm_queue_ms, "prefill_ms": self.prefill_ms,
                "decode_ms": self.decode_ms, "time_to_first_token_ms": self.time_to_first_token_ms}


#: The timing outputs of the ensembles and the ``StageTimings`` field each one fills.
TIMING_FIELDS = {T.TIMING_PREPROCESS: "preprocess_ms", T.TIMING_CLIP: "clip_ms", T.TIMING_DINOV2: "dinov2_ms",
                 T.TIMING_FUSION: "fusion_ms", T.TIMING_LLM: "llm_ms", T.TIMING_LLM_QUEUE: "llm_queue_ms",
                 T.TIMING_PREFILL: "prefill_ms", T.TIMING_DECODE: "decode_ms"}


@dataclass(frozen=True)
class Usage:
    """Tokens the language model read (text + visual tokens) and wrote (EOS included), as it counted them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class Delta:
    """New text of a streamed answer and how many tokens the model has written so far."""

    text: str
    completion_tokens: int


@dataclass
class Answer:
    """One question's answer. ``alpha`` is the effective alpha the fusion used (the request's, or for
    ``additive`` the profile's default; None for the other modes), decided by the engine
    (``TritonEngine.effective_alpha``): the transports report it as it is."""

    mode: FusionMode
    alpha: float | None
    answer: str
    chosen_option: str
    option_scores: list[float]
    timings: StageTimings
    usage: Usage = field(default_factory=Usage)
    finish_reason: str = "stop"  # "stop" (end of sequence) or "length" (max_new_tokens reached)


#: What a ``vqa_<mode>`` request asks for (those the ensemble has: ``engine`` filters by its metadata).
ASK_OUTPUTS = (T.TEXT_DELTA, T.ANSWER, T.CHOSEN_OPTION, T.OPTION_SCORES, T.FINISH_REASON, T.PROMPT_TOKENS,
               T.COMPLETION_TOKENS, T.ERROR_CODE, T.ERROR_MESSAGE, T.ERROR_FIELD, T.UPSTREAM_TIMINGS, *TIMING_FIELDS)


def text(array: np.ndarray | None) -> str:
    """The first element of a BYTES output as text ("" when absent)."""
    if array is None:
        return ""
    values = np.asarray(array).reshape(-1)
    if values.size == 0:
        return ""
    value = values[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _number(array: np.ndarray | None) -> float | None:
    if array is None:
        return None
    values = np.asarray(array).reshape(-1)
    return float(values[0]) if values.size else None


class AnswerBuilder:
    """Merges the responses of one ``vqa_<mode>`` request, in order, into deltas and the final ``Answer``.

    ``started`` is ``time.perf_counter()`` when the front-end sent the request: the time to the
    first response that carries generated text is the answer's ``time_to_first_token_ms``.
    """

    def __init__(self, started: float) -> None:
        self.started = started
        self.parts: list[str] = []
        self.steps = 0  # responses that carried TEXT_DELTA: one per decode step
        self.first_token_ms: float | None = None
        self.values: dict[str, np.ndarray] = {}  # the latest value of every other output seen

    def add(self, result) -> Delta | None:
        """Take one response's outputs (a tritonclient ``InferResult``); returns the new text, if any."""
        delta = None
        for name in ASK_OUTPUTS:
            array = result.as_numpy(name)
            if array is None:
                continue
            if name == T.TEXT_DELTA:
                self.steps += 1
                piece = text(array)
                if piece:
                    self.parts.append(piece)
                    delta = piece
            else:
                self.values[name] = array
        if self.first_token_ms is None and (self.steps or T.ANSWER in self.values):
            self.first_token_ms = (time.perf_counter() - self.started) * 1e3
        if delta is None:
            return None
        return Delta(delta, self._completion_tokens())

    def _completion_tokens(self) -> int:
        counted = _number(self.values.get(T.COMPLETION_TOKENS))
        return int(counted) if counted is not None else self.steps

    @property
    def finish_reason(self) -> str:
        """The model's ``FINISH_REASON``; "stop" from a model that does not say."""
        return text(self.values.get(T.FINISH_REASON)) or "stop"

    @property
    def error(self) -> tuple[str, str, str] | None:
        """``(ERROR_CODE, ERROR_MESSAGE, ERROR_FIELD)`` when the model ended the request with an error:
        data, read as such (``errors.model_error``), never parsed."""
        if self.finish_reason != "error" and T.ERROR_CODE not in self.values:
            return None
        return (text(self.values.get(T.ERROR_CODE)), text(self.values.get(T.ERROR_MESSAGE)),
                text(self.values.get(T.ERROR_FIELD)))

    def _timings(self, timings: StageTimings) -> None:
        upstream = self.values.get(T.UPSTREAM_TIMINGS)
        if upstream is not None:  # NaN: a stage this mode or target does not run or time
            for name, value in zip(T.UPSTREAM_STAGES, np.asarray(upstream, dtype=np.float64).reshape(-1),
                                   strict=False):
                if name in TIMING_FIELDS and np.isfinite(value):
                    setattr(timings, TIMING_FIELDS[name], float(value))
        for name, attr in TIMING_FIELDS.items():
            value = _number(self.values.get(name))
            if value is not None and np.isfinite(value):
                setattr(timings, attr, value)

    def answer(self, mode: FusionMode, alpha: float | None) -> Answer:
        """The final answer: the model's whole ``ANSWER`` (the deltas joined if it sent none);
        ``alpha`` is the effective alpha (the engine's)."""
        total_ms = (time.perf_counter() - self.started) * 1e3
        timings = StageTimings(total_ms=total_ms,
                               time_to_first_token_ms=self.first_token_ms if self.first_token_ms is not None
                               else total_ms)
        self._timings(timings)
        scores = self.values.get(T.OPTION_SCORES)
        whole = text(self.values[T.ANSWER]) if T.ANSWER in self.values else "".join(self.parts)
        prompt = _number(self.values.get(T.PROMPT_TOKENS))
        return Answer(mode, alpha, whole, text(self.values.get(T.CHOSEN_OPTION)),
                      [] if scores is None else [float(s) for s in np.asarray(scores).reshape(-1)], timings,
                      Usage(int(prompt) if prompt is not None else 0, self._completion_tokens()),
                      self.finish_reason)


@dataclass
class Tokens:
    """One image's visual tokens; ``alpha`` is the effective alpha, as in ``Answer``."""

    mode: FusionMode
    alpha: float | None
    tokens: np.ndarray  # [N, H] float32
    timings: StageTimings


@dataclass
class PatchEmbedding:
    """One image seen by both encoders: pooled embeddings and per-patch features (CLS dropped, the
    patch grid row-major), what the playground's CLIP-blind pair view compares patch by patch."""

    clip: np.ndarray  # [E] CLIP image_embeds
    dino: np.ndarray  # [Dd] DINOv2 normed CLS
    clip_patches: np.ndarray  # [P, Dc]
    dino_patches: np.ndarray  # [P, Dd]
    timings: StageTimings


@dataclass
class Embeddings:
    clip: np.ndarray  # [n, E]
    dino: np.ndarray  # [n, D]

    @staticmethod
    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


@dataclass
class TextEmbeddings:
    """CLIP text embeddings ``[n, E]`` (the space of ``Embeddings.clip``) and the checkpoint's
    ``exp(logit_scale)``: CLIP's logits are ``logit_scale * cosine(text, image)`` (None if the
    repository does not say)."""

    embeddings: np.ndarray
    logit_scale: float | None
