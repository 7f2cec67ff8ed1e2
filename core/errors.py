"""A refused request value as data: the field at fault and the reason, not a string to parse.

Raised by the core wherever a request's value is checked (options, question, sampling settings,
prompt length): the message still starts with the field for people ("max_new_tokens: must be
..."), and ``field`` carries it for code, so that the Triton models can send it on as
``ERROR_FIELD`` and the transports can name it (OpenAI's ``param``) without reading the text.
A ``ValueError``, so callers that only need "bad value" keep catching that.
"""

from __future__ import annotations


class FieldError(ValueError):
    """``field`` (the request field, e.g. "max_new_tokens") refused for ``detail``."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail
