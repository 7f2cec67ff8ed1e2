"""Plain results of the mofserve client (dataclasses and numpy arrays, never protobufs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mofserve.v1 import mofserve_pb2 as pb


@dataclass(frozen=True)
class Timings:
    """Milliseconds per stage as the Triton ensemble reported them; ``encoders_ms`` is the slower
    encoder (they run side by side); an encoder answered from its feature cache reports ~0.
    ``llm_ms`` is made of ``llm_queue_ms`` (waiting for a place in the batch), ``prefill_ms`` (up
    to the first token) and ``decode_ms``; ``total_ms`` and ``time_to_first_token_ms`` are the
    server front-end's measure of the whole answer and of its first token."""

    preprocess_ms: float = 0.0
    encoders_ms: float = 0.0
    clip_ms: float = 0.0
    dinov2_ms: float = 0.0
    fusion_ms: float = 0.0
    llm_ms: float = 0.0
    total_ms: float = 0.0
    llm_queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    time_to_first_token_ms: float = 0.0

    @classmethod
    def from_proto(cls, message: pb.StageTimings) -> Timings:
        return cls(message.preprocess_ms, message.encoders_ms, message.clip_ms, message.dinov2_ms,
                   message.fusion_ms, message.llm_ms, message.total_ms, message.llm_queue_ms,
                   message.prefill_ms, message.decode_ms, message.time_to_first_token_ms)


@dataclass(frozen=True)
class Usage:
    """Tokens the language model read (the prompt, visual tokens included) and wrote."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_proto(cls, message: pb.Usage) -> Usage:
        return cls(message.prompt_tokens, message.completion_tokens, message.total_tokens)


@dataclass(frozen=True)
class Provenance:
    """Where a result came from; ``notice`` is set when the profile has random weights."""

    profile: str = ""
    random_weights: bool = False
    notice: str = ""
    model_versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, message: pb.Provenance) -> Provenance:
        return cls(message.profile, message.random_weights, message.notice, dict(message.model_versions))


def _alpha(message) -> float | None:
    return message.alpha if message.HasField("alpha") else None


@dataclass(frozen=True)
class AskResult:
    answer: str
    chosen_option: str  # option letter ("a"), "" when no options were given
    option_scores: list[float]
    timings: Timings
    mode: str
    alpha: float | None  # additive only: the alpha used (the server's default when none was sent)
    provenance: Provenance
    usage: Usage = field(default_factory=Usage)
    finish_reason: str = ""  # "stop" (the model ended its answer) or "length" (max_new_tokens reached)

    @property
    def random_weights(self) -> bool:
        return self.provenance.random_weights

    @property
    def notice(self) -> str:
        return self.provenance.notice

    @classmethod
    def from_proto(cls, message: pb.AskResponse) -> AskResult:
        return cls(message.answer, message.chosen_option, list(message.option_scores),
                   Timings.from_proto(message.timings), message.mode, _alpha(message),
                   Provenance.from_proto(message.provenance), Usage.from_proto(message.usage),
                   message.finish_reason)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TokenDelta:
    """New text of a streamed answer (``ask_stream``) and the tokens written so far."""

    text: str
    completion_tokens: int

    @classmethod
    def from_proto(cls, message: pb.TokenDelta) -> TokenDelta:
        return cls(message.text, message.completion_tokens)


def stream_item(message: pb.AskStreamResponse) -> TokenDelta | AskResult:
    """One ``AskStream`` message as a ``TokenDelta`` or, for the final one, the ``AskResult``."""
    if message.WhichOneof("event") == "final":
        return AskResult.from_proto(message.final)
    return TokenDelta.from_proto(message.delta)


def tensor_to_numpy(message: pb.Tensor) -> np.ndarray:
    """A ``Tensor`` (little-endian bytes + shape + dtype) as a writable native numpy array."""
    try:
        dtype = np.dtype(message.dtype)
    except TypeError:
        raise ValueError(f"tensor: unknown dtype {message.dtype!r}") from None
    wire = np.frombuffer(message.data, dtype=dtype.newbyteorder("<"))
    return wire.astype(dtype.newbyteorder("="), copy=True).reshape(tuple(message.shape))


@dataclass(frozen=True)
class EncodeResult:
    tokens: np.ndarray  # [N, H] float32
    mode: str
    alpha: float | None
    timings: Timings
    provenance: Provenance

    @classmethod
    def from_proto(cls, message: pb.EncodeResponse) -> EncodeResult:
        return cls(tensor_to_numpy(message.tokens), message.mode, _alpha(message), Timings.from_proto(message.timings),
                   Provenance.from_proto(message.provenance))


@dataclass(frozen=True)
class EmbedResult:
    clip: np.ndarray  # [n, E] pooled CLIP image embeddings, one row per image
    dinov2: np.ndarray  # [n, D] DINOv2 CLS embeddings
    clip_cosine: float | None  # set for exactly two images
    dinov2_cosine: float | None
    total_ms: float
    provenance: Provenance

    @classmethod
    def from_proto(cls, message: pb.EmbedResponse) -> EmbedResult:
        clip = np.stack([tensor_to_numpy(e.clip) for e in message.embeddings])
        dino = np.stack([tensor_to_numpy(e.dinov2) for e in message.embeddings])
        similar = message.HasField("similarity")
        return cls(clip, dino, message.similarity.clip_cosine if similar else None,
                   message.similarity.dinov2_cosine if similar else None, message.total_ms,
                   Provenance.from_proto(message.provenance))


@dataclass(frozen=True)
class TextEmbedResult:
    """CLIP text embeddings, comparable with ``EmbedResult.clip`` by cosine."""

    embeddings: np.ndarray  # [n, E] float32, one row per text (not normalised)
    logit_scale: float | None  # the checkpoint's exp(logit_scale): CLIP logits = logit_scale * cosine
    total_ms: float
    provenance: Provenance

    @classmethod
    def from_proto(cls, message: pb.EmbedTextResponse) -> TextEmbedResult:
        return cls(np.stack([tensor_to_numpy(e) for e in message.embeddings]),
                   message.logit_scale if message.HasField("logit_scale") else None, message.total_ms,
                   Provenance.from_proto(message.provenance))


@dataclass(frozen=True)
class ServerInfo:
    version: str
    modes: list[str]
    default_mode: str
    default_alpha: float | None
    limits: dict[str, int]
    provenance: Provenance

    @classmethod
    def from_proto(cls, message: pb.ServerInfo) -> ServerInfo:
        limits = {f.name: getattr(message.limits, f.name) for f in message.limits.DESCRIPTOR.fields}
        return cls(message.version, list(message.modes), message.default_mode,
                   message.default_alpha if message.HasField("default_alpha") else None, limits,
                   Provenance.from_proto(message.provenance))
