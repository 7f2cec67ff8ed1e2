"""What a request to the engine is (a question, a fusion mode, generation settings) and the limits
checked before anything reaches Triton, each refusal an ``EngineError`` with the field at fault as
data (``field``) and named first in its message. Both transports build these; ``engine``
re-exports them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mofserve.core.conversation import parse_options
from mofserve.core.fusion import check_alpha
from mofserve.core.tensors import FusionMode

from .errors import EngineError


@dataclass(frozen=True)
class Limits:
    """Request limits enforced before anything reaches Triton (the models re-check images)."""

    max_image_bytes: int = 20 << 20
    max_question_chars: int = 2000
    max_options_chars: int = 2000
    max_new_tokens: int = 512
    max_compare_modes: int = 8
    max_embed_images: int = 64
    max_embed_texts: int = 64
    max_text_chars: int = 2000


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    def validate(self, limits: Limits) -> GenerationParams:
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= limits.max_new_tokens:
            raise EngineError.refused("max_new_tokens", f"must be within [1, {limits.max_new_tokens}], "
                                                        f"got {self.max_new_tokens}")
        if self.temperature is not None and not (math.isfinite(self.temperature) and 0 <= self.temperature <= 2):
            raise EngineError.refused("temperature", f"must be within [0, 2], got {self.temperature}")
        if self.top_p is not None and not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise EngineError.refused("top_p", f"must be within (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise EngineError.refused("seed", f"must be within [0, 2^63), got {self.seed}")
        return self


@dataclass(frozen=True)
class Selection:
    """A fusion mode and, for ``additive``, its DINOv2 proportion (None: the profile default)."""

    mode: FusionMode
    alpha: float | None = None

    @classmethod
    def parse(cls, mode: str, alpha: float | None = None) -> Selection:
        try:
            parsed = FusionMode.parse(mode)
        except ValueError as error:  # "mode: unknown fusion mode ..."
            raise EngineError("invalid_argument", str(error), "mode") from None
        if alpha is not None:
            if parsed is not FusionMode.ADDITIVE:
                raise EngineError.refused("alpha", f"only the additive mode takes alpha, not {parsed.value!r}")
            try:
                alpha = check_alpha(alpha)
            except ValueError as error:  # "alpha: must be within [0, 1] ..."
                raise EngineError("invalid_argument", str(error), "alpha") from None
        return cls(parsed, alpha)


@dataclass(frozen=True)
class Question:
    image: bytes
    question: str
    options: str | None = None
    generation: GenerationParams = field(default_factory=GenerationParams)


def check_image(image: bytes, limits: Limits, field_name: str = "image") -> None:
    if not image:
        raise EngineError.refused(field_name, "empty; send the encoded image bytes")
    if len(image) > limits.max_image_bytes:
        raise EngineError.refused(field_name, f"{len(image)} bytes exceeds the limit of {limits.max_image_bytes} "
                                              "bytes (max_image_bytes)", "too_large")


def check_utf8(text: str, field_name: str) -> None:
    """Strings go to Triton as UTF-8: one holding an unpaired surrogate (JSON's ``"\\ud800"``
    decodes to one) cannot be sent, and is the caller's error, not the server's."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        where = f"unpaired surrogate U+{ord(text[error.start]):04X} at character {error.start}"
        raise EngineError.refused(field_name, f"not valid UTF-8 ({where})") from None


def check_question(q: Question, limits: Limits) -> None:
    """Everything about a question that can be refused before Triton, naming the field."""
    check_image(q.image, limits)
    check_utf8(q.question, "question")
    if q.options is not None:
        check_utf8(q.options, "options")
    if not q.question.strip():
        raise EngineError.refused("question", "empty; ask something about the image")
    if len(q.question) > limits.max_question_chars:
        raise EngineError.refused("question", f"{len(q.question)} characters exceeds the limit of "
                                              f"{limits.max_question_chars} (max_question_chars)")
    if q.options is not None and q.options.strip():
        if len(q.options) > limits.max_options_chars:
            raise EngineError.refused("options", f"{len(q.options)} characters exceeds the limit of "
                                                 f"{limits.max_options_chars} (max_options_chars)")
        try:
            parse_options(q.options)
        except ValueError as error:  # "options: ..."
            raise EngineError("invalid_argument", str(error), "options") from None
    q.generation.validate(limits)
