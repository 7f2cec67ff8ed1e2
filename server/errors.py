"""The front-end's transport-neutral errors, and Triton's errors turned into them.

``EngineError.code`` is a key of ``ERROR_CODES``, which each transport maps to its own status
(gRPC status, HTTP status). Kept apart from ``engine`` so that the stream mechanics
(``triton_stream``) can raise them too without importing the engine.
"""

from __future__ import annotations

import re

from mofserve.core.preprocessing import image_error_code

# transport-neutral error codes -> (gRPC status name, HTTP status)
ERROR_CODES = {
    "invalid_argument": ("INVALID_ARGUMENT", 400),
    "too_large": ("RESOURCE_EXHAUSTED", 413),
    "resource_exhausted": ("RESOURCE_EXHAUSTED", 429),
    "deadline_exceeded": ("DEADLINE_EXCEEDED", 504),
    "unavailable": ("UNAVAILABLE", 503),
    "not_found": ("NOT_FOUND", 404),
    "internal": ("INTERNAL", 500),
}


class EngineError(Exception):
    """A request that could not be answered; ``code`` is a key of ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_TRITON_CODES = {"StatusCode.INVALID_ARGUMENT": "invalid_argument", "StatusCode.UNAVAILABLE": "unavailable",
                 "StatusCode.DEADLINE_EXCEEDED": "deadline_exceeded", "StatusCode.NOT_FOUND": "not_found",
                 "StatusCode.RESOURCE_EXHAUSTED": "resource_exhausted"}

#: Fields a model names first when it refuses a request's value ("image: cannot decode ..."): a
#: stream's error response carries no status code, so its text says it was the caller's.
_REQUEST_FIELDS = re.compile(r"^(image|question|options|alpha|max_new_tokens|temperature|top_p|seed|text|texts)"
                             r"(\[\d+\])?: ")


def triton_error(message: str, status: str | None = None) -> EngineError:
    """An error of Triton's as an ``EngineError``: ``status`` is the gRPC status of a unary call
    ("StatusCode.INVALID_ARGUMENT"); a stream's error responses have none (Triton 2.51 keeps only
    the text), so then the code comes from the text: a request field named first is the caller's
    error, "unknown model" is not_found, anything else internal (with the rules below)."""
    for prefix in ("in ensemble ",):
        # "in ensemble 'vqa_clip', image: ..." -> "image: ..." (the field first, as everywhere)
        if message.startswith(prefix) and ", " in message:
            message = message.split(", ", 1)[1]
    if status is not None:
        code = _TRITON_CODES.get(status, "internal")
    elif _REQUEST_FIELDS.match(message):
        code = "invalid_argument"
    elif "unknown model" in message or " is not found" in message:
        code = "not_found"
    elif "maximum queue size" in message.lower():
        code = "resource_exhausted"  # Triton's own queue (a model's max_queue_size) is full
    else:
        code = "internal"
    image_at = message.find("image:")
    if image_at >= 0 and image_error_code(message[image_at:]) == "too_large":
        code = "too_large"  # the model answers INVALID_ARG for every image error; its text tells which
    if code == "internal" and ("Deadline" in message or "timeout" in message.lower()):
        code = "deadline_exceeded"
    if code == "internal" and "Stub process" in message and "is not healthy" in message:
        code = "unavailable"  # a dead python-backend stub: the supervisor restarts Triton (server/probe.py)
    return EngineError(code, message)


def model_error(code: str, message: str) -> EngineError:
    """An error the ``llm`` model sent as data (``ERROR_CODE``, ``ERROR_MESSAGE``): its code is one
    of ours already; anything unexpected is internal."""
    return EngineError(code if code in ERROR_CODES else "internal", message or f"llm: failed ({code or 'no code'})")
