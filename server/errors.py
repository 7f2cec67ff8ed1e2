"""The front-end's transport-neutral errors, and Triton's errors turned into them.

An ``EngineError`` is data: ``code`` (one of ``ERROR_CODES``), ``field`` (the request field at
fault, or None) and ``message`` (for humans). Each transport maps the code to its own status in a
table of its own (``grpc_service.GRPC_STATUS``, ``openai_protocol.HTTP_STATUS``) and names the field
from ``field``; the message starts with the field for the reader's sake, and nothing parses it back.
Kept apart from ``engine`` so that the stream mechanics (``triton_stream``) can raise them too
without importing the engine.
"""

from __future__ import annotations

import re

from mofserve.core.preprocessing import image_error_code

#: The engine's transport-neutral error codes.
ERROR_CODES = frozenset({"invalid_argument", "too_large", "resource_exhausted", "deadline_exceeded", "unavailable",
                         "not_found", "internal"})


class EngineError(Exception):
    """A request that could not be answered: ``code`` (one of ``ERROR_CODES``: the transports'
    status), ``field`` (the request field at fault: "max_new_tokens", "options", "images[3]",
    "modes[1].alpha"; None when no single field is) and ``message``, which names the field first for
    a human reader ("max_new_tokens: must be within [1, 512], got 0") but is never parsed."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    @classmethod
    def refused(cls, field: str, detail: str, code: str = "invalid_argument") -> EngineError:
        """The caller's value of ``field`` refused: the message is "field: detail", so that its
        text and its data cannot disagree."""
        return cls(code, f"{field}: {detail}", field)


#: Triton's gRPC statuses (by name, as grpc.StatusCode names them) as engine codes: one table for
#: the unary calls (tritonclient's "StatusCode.X") and the streams' failed RPCs (triton_stream).
TRITON_STATUS_CODES = {"INVALID_ARGUMENT": "invalid_argument", "UNAVAILABLE": "unavailable",
                       "DEADLINE_EXCEEDED": "deadline_exceeded", "NOT_FOUND": "not_found",
                       "RESOURCE_EXHAUSTED": "resource_exhausted", "UNIMPLEMENTED": "internal"}


def triton_status_code(status: str, default: str = "internal") -> str:
    """The engine code of a Triton gRPC status ("StatusCode.NOT_FOUND" or "NOT_FOUND")."""
    return TRITON_STATUS_CODES.get(status.removeprefix("StatusCode."), default)


#: The request fields a Triton model names first when it refuses a value ("image: cannot decode ...").
_REQUEST_FIELD = re.compile(r"^(?:image|question|options|alpha|max_new_tokens|temperature|top_p|seed|text|texts)"
                            r"(?:\[\d+\])?(?=: )")


def triton_error(message: str, status: str | None = None) -> EngineError:
    """An error of Triton's as an ``EngineError`` (code, field, message): the one place in the
    front-end that reads an error's text.

    Why it must: ``status`` is the gRPC status of a unary call ("StatusCode.INVALID_ARGUMENT"), but
    a stream's error responses have none (Triton 2.51 keeps only the text, ``triton_stream``), and
    neither says which request field was at fault, nor whether an image was refused as too large
    (the ``preprocess`` model answers INVALID_ARG for every image error). So the text is read here,
    once, at the Triton boundary, and everything after works on the data: a request field named
    first is the field (and, without a status, the caller's error), "unknown model" is not_found,
    anything else internal (with the rules below). The ``llm`` model's own errors arrive as data
    instead (``model_error``)."""
    if message.startswith("in ensemble ") and ", " in message:
        # "in ensemble 'vqa_clip', image: ..." -> "image: ..." (the field first, as everywhere)
        message = message.split(", ", 1)[1]
    named = _REQUEST_FIELD.match(message)
    field = named.group(0) if named else None
    if status is not None:
        code = triton_status_code(status)
    elif field is not None:
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
    return EngineError(code, message, field)


def model_error(code: str, message: str, field: str = "") -> EngineError:
    """An error the ``llm`` model sent as data (``ERROR_CODE``, ``ERROR_MESSAGE``, ``ERROR_FIELD``):
    its code is one of ours already (anything unexpected is internal), its field the request field
    at fault ("" for none; a repository older than ERROR_FIELD sends none)."""
    return EngineError(code if code in ERROR_CODES else "internal", message or f"llm: failed ({code or 'no code'})",
                       field or None)
