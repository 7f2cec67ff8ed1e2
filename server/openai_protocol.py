"""The OpenAI chat-completions wire format of mofserve's HTTP front-end (schemas and parsing).

Pure functions, no I/O: ``parse_chat_request`` turns a decoded JSON body into the engine's
typed request (``Question`` + ``Selection``) or raises ``ProtocolError`` naming the field;
``chat_completion`` / ``ChunkStream`` (the ``chat.completion.chunk`` objects of a streamed answer,
as Server-Sent Events with ``sse``) / ``model_list`` build the responses; ``error_body`` and
``from_engine_error`` give OpenAI's error shape, the HTTP status of an engine error coming from this
transport's own table, ``HTTP_STATUS``. ``http_api`` does the serving.

Decisions (docs/api.md, "HTTP (OpenAI-compatible)"):
- ``model`` names the fusion mode: ``mofserve-<mode>`` or the bare mode name; else 404.
- exactly one ``user`` message holding exactly one image as a base64 ``data:`` URL and some text;
  ``system``/``developer`` messages are ignored (the llm model has its own fixed prompt) and the
  response says so in ``mofserve.warnings``; prior ``assistant``/``tool`` turns are refused.
- the server never fetches from the network: an http(s) image URL is refused.
- standard OpenAI fields that do not change the answer are ignored; those that would (``stop``,
  ``tools``, ``logprobs``, penalties, ...) are accepted only at their default value; unknown
  top-level fields are refused (as OpenAI does), which catches typos such as ``aplha``.
- omitted ``temperature`` means greedy decoding (the model's default), not OpenAI's 1.0.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mofserve.core.tensors import FusionMode

from .engine import Answer, EngineError, GenerationParams, Limits, Question, Selection, ServingInfo

MODEL_PREFIX = "mofserve-"
OWNED_BY = "mofserve"


def model_id(mode: FusionMode | str) -> str:
    """The OpenAI model id of a fusion mode: ``mofserve-<mode>``."""
    return MODEL_PREFIX + FusionMode.parse(str(mode)).value


MODEL_IDS = tuple(model_id(m) for m in FusionMode)

#: The HTTP status of each of the engine's error codes (``errors.ERROR_CODES``): this transport's
#: own table (gRPC has ``grpc_service.GRPC_STATUS``). Statuses are made from codes, never the reverse.
HTTP_STATUS: dict[str, int] = {"invalid_argument": 400, "too_large": 413, "resource_exhausted": 429,
                               "deadline_exceeded": 504, "unavailable": 503, "not_found": 404, "internal": 500}


class ProtocolError(Exception):
    """A request refused by the HTTP front-end; rendered in OpenAI's error shape by ``error_body``.

    ``code`` is OpenAI's ``error.code`` (``unknown_parameter``, ``model_not_found``, ...);
    ``reason`` is the engine's transport-neutral code of the refusal, what the metrics count (as
    for an ``EngineError``): given where the error is made, never derived from ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_argument",
                 kind: str | None = None, *, reason: str = "invalid_argument") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.reason = reason
        self.type = kind or error_type(status)  # OpenAI's error.type


def error_type(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status."""
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(error: ProtocolError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def resolve_model(name: Any) -> FusionMode:
    """``mofserve-additive`` or ``additive`` -> FusionMode.ADDITIVE; 404 for anything else."""
    if name is None:
        raise ProtocolError(400, "model: required; one of " + ", ".join(MODEL_IDS), "model")
    if not isinstance(name, str):
        raise ProtocolError(400, f"model: must be a string, got {type(name).__name__}", "model")
    bare = name[len(MODEL_PREFIX):] if name.startswith(MODEL_PREFIX) else name
    try:
        return FusionMode(bare)
    except ValueError:
        raise ProtocolError(404, f"model: {name!r} does not exist; available: " + ", ".join(MODEL_IDS),
                            "model", "model_not_found", reason="not_found") from None


# ---- data URLs ----------------------------------------------------------------------------

_DATA_URL = re.compile(r"^data:(?P<media>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.DOTALL)
_WHITESPACE = re.compile(r"\s+")


def decode_data_url(url: Any, param: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL; 400 naming ``param`` for anything else,
    413 when the decoded image would exceed ``max_bytes`` (checked before decoding)."""
    if not isinstance(url, str):
        raise ProtocolError(400, f"{param}: must be a string, got {type(url).__name__}", param)
    head = url[:16].lower()
    if head.startswith(("http://", "https://")):
        raise ProtocolError(400, f"{param}: http(s) image URLs are not fetched (mofserve never reaches the "
                                 "network); send the image inline as 'data:image/png;base64,...'", param)
    match = _DATA_URL.match(url)
    if not match:
        shown = url[:32] + ("..." if len(url) > 32 else "")
        raise ProtocolError(400, f"{param}: expected a data URL 'data:image/<type>;base64,<data>', got {shown!r}",
                            param)
    media = match["media"].strip().lower()
    if not media.startswith("image/"):
        raise ProtocolError(400, f"{param}: the data URL's media type must be image/*, got {media or 'none'!r}",
                            param)
    if "base64" not in (p.strip().lower() for p in match["params"].split(";")):
        raise ProtocolError(400, f"{param}: the data URL must be base64-encoded ('data:{media};base64,...')", param)
    data = _WHITESPACE.sub("", match["data"])
    if not data:
        raise ProtocolError(400, f"{param}: the data URL holds no image data", param)
    size = len(data) * 3 // 4 - data[-2:].count("=")
    if size > max_bytes:
        raise ProtocolError(413, f"{param}: the image is {size} bytes, over the limit of {max_bytes} bytes "
                                 "(max_image_bytes)", param, "too_large", reason="too_large")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ProtocolError(400, f"{param}: invalid base64 in the data URL ({error})", param) from None


def data_url(image: bytes, media_type: str = "image/png") -> str:
    """The inverse of ``decode_data_url`` (for clients and tests)."""
    return f"data:{media_type};base64,{base64.b64encode(image).decode('ascii')}"


# ---- request ------------------------------------------------------------------------------

def _is_default_off(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == [] or value == {} or value == ""


# Standard OpenAI chat-completion fields that mofserve does not implement: accepted when their
# value is the default (so generic clients work), refused otherwise (silently ignoring them would
# change the meaning of the request).
UNSUPPORTED_UNLESS_DEFAULT: dict[str, Callable[[Any], bool]] = {
    "frequency_penalty": _is_default_off,
    "presence_penalty": _is_default_off,
    "logit_bias": _is_default_off,
    "logprobs": _is_default_off,
    "top_logprobs": _is_default_off,
    "stop": _is_default_off,
    "tools": _is_default_off,
    "tool_choice": lambda v: v is None or v == "none",
    "functions": _is_default_off,
    "function_call": lambda v: v is None or v == "none",
    "response_format": lambda v: v is None or (isinstance(v, Mapping) and v.get("type") == "text"),
    "modalities": lambda v: v is None or v == ["text"],
    "audio": _is_default_off,
    "prediction": _is_default_off,
    "web_search_options": _is_default_off,
}
# Standard fields that do not change the answer: ignored.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls",
                            "prompt_cache_key", "safety_identifier", "reasoning_effort", "verbosity"})
# Fields mofserve reads.
KNOWN_FIELDS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                          "seed", "n", "stream", "stream_options", "alpha", "options"})


@dataclass
class ChatRequest:
    """A validated chat-completion request, ready for ``TritonEngine.ask``."""

    model: str  # the canonical model id, echoed in the response
    selection: Selection
    question: Question
    stream: bool = False
    include_usage: bool = False
    warnings: list[str] = field(default_factory=list)
    # engine field name -> the wire parameter it came from (to name it in engine errors)
    params: dict[str, str] = field(default_factory=dict)


def _number(body: Mapping[str, Any], name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(400, f"{name}: must be a number, got {type(value).__name__}", name)
    value = float(value)
    inside = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ProtocolError(400, f"{name}: must be within {interval}, got {value:g}", name)
    return value


def _integer(body: Mapping[str, Any], name: str, low: int, high: int, limit_name: str | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(400, f"{name}: must be an integer, got {type(value).__name__}", name)
    if not low <= value <= high:
        suffix = f" ({limit_name})" if limit_name else ""
        raise ProtocolError(400, f"{name}: must be within [{low}, {high}]{suffix}, got {value}", name)
    return value


def _text_of(content: Any, param: str) -> str:
    """The text of a system/developer message (string or text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ProtocolError(400, f"{param}[{j}]: a system message may hold text parts only", f"{param}[{j}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ProtocolError(400, f"{param}: must be a string or a list of content parts", param)


def _user_content(content: Any, param: str, limits: Limits) -> tuple[str, bytes, str, str]:
    """(question, image bytes, question param, image param) of the user message."""
    if isinstance(content, str):
        raise ProtocolError(400, f"{param}: an image is required; send a list of parts with one "
                                 "{'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,...'}} "
                                 "and one {'type': 'text', 'text': ...}", param)
    if not isinstance(content, list) or not content:
        raise ProtocolError(400, f"{param}: must be a non-empty list of content parts", param)
    texts: list[str] = []
    images: list[tuple[bytes, str]] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, Mapping):
            raise ProtocolError(400, f"{where}: must be an object with a 'type'", where)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ProtocolError(400, f"{where}.text: must be a string", f"{where}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            image_url = part.get("image_url")
            if isinstance(image_url, str):  # some clients send the URL directly
                url, url_param = image_url, f"{where}.image_url"
            elif isinstance(image_url, Mapping):
                url, url_param = image_url.get("url"), f"{where}.image_url.url"
                detail = image_url.get("detail")
                if detail is not None and detail not in ("auto", "low", "high"):
                    raise ProtocolError(400, f"{where}.image_url.detail: must be auto, low or high, got {detail!r}",
                                        f"{where}.image_url.detail")
            else:
                raise ProtocolError(400, f"{where}.image_url: must be an object {{'url': 'data:image/...'}}",
                                    f"{where}.image_url")
            if url is None:
                raise ProtocolError(400, f"{url_param}: required", url_param)
            images.append((decode_data_url(url, url_param, limits.max_image_bytes), url_param))
        else:
            raise ProtocolError(400, f"{where}.type: unsupported content part {kind!r}; expected 'text' or "
                                     "'image_url'", f"{where}.type")
    if len(images) != 1:
        raise ProtocolError(400, f"{param}: exactly one image_url part is required, got {len(images)}", param)
    question = "\n".join(t for t in texts if t.strip())
    if not question.strip():
        raise ProtocolError(400, f"{param}: a text part with the question is required", param)
    return question, images[0][0], param, images[0][1]


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body; ``ProtocolError`` names the first bad field."""
    if not isinstance(body, Mapping):
        raise ProtocolError(400, f"body: must be a JSON object, got {type(body).__name__}", None)
    for name in body:
        if name in KNOWN_FIELDS or name in IGNORED_FIELDS:
            continue
        check = UNSUPPORTED_UNLESS_DEFAULT.get(name)
        if check is None:
            raise ProtocolError(400, f"{name}: unrecognized request argument", name, "unknown_parameter")
        if not check(body[name]):
            raise ProtocolError(400, f"{name}: not supported by mofserve (only its default value is accepted)",
                                name, "unsupported_parameter")
    mode = resolve_model(body.get("model"))
    params: dict[str, str] = {}
    warnings: list[str] = []

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError(400, "messages: must be a non-empty list of messages", "messages")
    user: tuple[str, bytes] | None = None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ProtocolError(400, f"{where}: must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role in ("system", "developer"):
            _text_of(message.get("content"), f"{where}.content")
            warnings.append(f"{where}: {role} message ignored (the model uses its own fixed prompt)")
        elif role == "user":
            if user is not None:
                raise ProtocolError(400, f"{where}: exactly one user message is supported (one question "
                                         "about one image per request)", where)
            question, image, q_param, i_param = _user_content(message.get("content"), f"{where}.content", limits)
            user = (question, image)
            params.update(question=q_param, image=i_param)
        elif role in ("assistant", "tool", "function"):
            raise ProtocolError(400, f"{where}: {role!r} turns are not supported; mofserve answers one "
                                     "question about one image per request: send a single user message", where)
        else:
            raise ProtocolError(400, f"{where}.role: unknown role {role!r}", f"{where}.role")
    if user is None:
        raise ProtocolError(400, "messages: a user message with the image and the question is required", "messages")

    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ProtocolError(400, f"n: only one choice per request is supported (n=1), got {n!r}", "n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ProtocolError(400, f"stream: must be a boolean, got {type(stream).__name__}", "stream")
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise ProtocolError(400, "stream_options: only allowed with stream: true", "stream_options")
        if not isinstance(stream_options, Mapping):
            raise ProtocolError(400, "stream_options: must be an object", "stream_options")
        include_usage = stream_options.get("include_usage") or False
        if not isinstance(include_usage, bool):
            raise ProtocolError(400, "stream_options.include_usage: must be a boolean",
                                "stream_options.include_usage")

    tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_new_tokens = _integer(body, tokens_name, 1, limits.max_new_tokens, "max_new_tokens")
    params["max_new_tokens"] = tokens_name
    generation = GenerationParams(
        max_new_tokens=max_new_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0, low_open=True),
        seed=_integer(body, "seed", 0, 2**63 - 1),
    )

    alpha = _number(body, "alpha", 0.0, 1.0)
    if alpha is not None and mode is not FusionMode.ADDITIVE:
        raise ProtocolError(400, f"alpha: only the additive mode (mofserve-additive) takes alpha, not "
                                 f"{model_id(mode)!r}", "alpha")
    options = body.get("options")
    if options is not None:
        if isinstance(options, list) and all(isinstance(o, str) for o in options):
            # ["Left", "Right"]: lettered a, b, ... by the model; characters kept as sent (not \u-escaped),
            # so that max_options_chars counts what the client wrote
            options = json.dumps(options, ensure_ascii=False)
        if not isinstance(options, str):
            raise ProtocolError(400, "options: must be a string like '(a) Left (b) Right' or a list of strings, "
                                     f"got {type(options).__name__}", "options")
        if len(options) > limits.max_options_chars:
            raise ProtocolError(400, f"options: {len(options)} characters exceeds the limit of "
                                     f"{limits.max_options_chars} (max_options_chars)", "options")
    question, image = user
    if len(question) > limits.max_question_chars:
        raise ProtocolError(400, f"{params['question']}: the question has {len(question)} characters, over the "
                                 f"limit of {limits.max_question_chars} (max_question_chars)", params["question"])
    try:
        selection = Selection.parse(mode.value, alpha)
        generation.validate(limits)
    except EngineError as error:
        raise from_engine_error(error, params) from None
    return ChatRequest(model=model_id(mode), selection=selection,
                       question=Question(image=image, question=question, options=options, generation=generation),
                       stream=bool(stream), include_usage=include_usage, warnings=warnings, params=params)


# ---- errors from the engine ---------------------------------------------------------------

_ENGINE_OPENAI_CODES = {"not_found": "model_not_found"}


def from_engine_error(error: EngineError, params: Mapping[str, str] | None = None) -> ProtocolError:
    """An ``EngineError`` in OpenAI's shape: the status from ``HTTP_STATUS`` (else 500), ``param`` the
    wire name of ``error.field`` (``params``: ``image`` -> ``messages[0].content[1].image_url.url``),
    or the field itself where the body has it, else None. The message is passed on, never read."""
    status = HTTP_STATUS.get(error.code, HTTP_STATUS["internal"])
    param = (params or {}).get(error.field, error.field if error.field in KNOWN_FIELDS else None)
    if error.code == "not_found":  # the mode's ensemble is not in this repository
        param = "model"
    return ProtocolError(status, error.message, param, _ENGINE_OPENAI_CODES.get(error.code, error.code),
                         reason=error.code)


# ---- responses ----------------------------------------------------------------------------

def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def mofserve_extension(answer: Answer, info: ServingInfo, *, warnings: list[str] | None = None) -> dict[str, Any]:
    """What the answer says about itself beyond OpenAI's schema (the response's ``mofserve`` object);
    ``alpha`` is the answer's effective alpha, as the engine decided it."""
    return {
        "mode": answer.mode.value,
        "alpha": answer.alpha,
        "chosen_option": answer.chosen_option,
        "option_scores": answer.option_scores,
        "timings": answer.timings.as_dict(),
        "profile": info.profile,
        "random_weights": info.random_weights,
        "versions": dict(info.versions),
        "notice": info.notice or None,  # shared with the gRPC answers
        "warnings": list(warnings or []),
    }


def usage(answer: Answer) -> dict[str, int]:
    """OpenAI's ``usage``: the tokens the language model read (visual tokens included) and wrote."""
    return answer.usage.as_dict()


def chat_completion(request: ChatRequest, answer: Answer, info: ServingInfo, *, ident: str,
                    created: int) -> dict[str, Any]:
    """A ``chat.completion`` object plus the ``mofserve`` extension."""
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer.answer, "refusal": None},
            "logprobs": None,
            "finish_reason": answer.finish_reason,
        }],
        "usage": usage(answer),
        "mofserve": mofserve_extension(answer, info, warnings=request.warnings),
    }


class ChunkStream:
    """The ``chat.completion.chunk`` objects of one streamed answer, in OpenAI's order: ``start``
    (the role), a ``content`` chunk per piece of text as it is generated, then ``finish`` (an
    empty delta with the finish reason and the ``mofserve`` extension, and, when the request set
    ``stream_options.include_usage``, a last chunk with no choices and the ``usage``; every other
    chunk then carries ``"usage": null``, as OpenAI's do)."""

    def __init__(self, request: ChatRequest, *, ident: str, created: int) -> None:
        self.request = request
        self.ident = ident
        self.created = created

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        chunk = {"id": self.ident, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.request.model, "system_fingerprint": None, "choices": choices}
        if self.request.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return chunk

    def _choice(self, delta: dict[str, Any], finish_reason: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

    def start(self) -> dict[str, Any]:
        return self._chunk(self._choice({"role": "assistant", "content": ""}))

    def content(self, text: str) -> dict[str, Any]:
        return self._chunk(self._choice({"content": text}))

    def finish(self, answer: Answer, info: ServingInfo) -> list[dict[str, Any]]:
        extension = mofserve_extension(answer, info, warnings=self.request.warnings)
        chunks = [self._chunk(self._choice({}, answer.finish_reason), mofserve=extension)]
        if self.request.include_usage:
            chunks.append(self._chunk([], usage=usage(answer)))
        return chunks


#: The last event of a successful stream.
SSE_DONE = b"data: [DONE]\n\n"


def sse(chunk: dict[str, Any]) -> bytes:
    """One Server-Sent Event carrying ``chunk`` as JSON."""
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def sse_error(error: ProtocolError) -> bytes:
    """An error after the stream began (its HTTP status is already 200): an ``error`` event with
    OpenAI's error body, which the ``openai`` client raises as ``APIError``; no ``[DONE]`` follows."""
    return b"event: error\ndata: " + json.dumps(error_body(error)).encode() + b"\n\n"


def model_card(mode: FusionMode, info: ServingInfo, created: int) -> dict[str, Any]:
    return {"id": model_id(mode), "object": "model", "created": created, "owned_by": OWNED_BY,
            "mofserve": {"mode": mode.value, "takes_alpha": mode is FusionMode.ADDITIVE, "profile": info.profile,
                         "random_weights": info.random_weights}}


def model_list(info: ServingInfo, created: int) -> dict[str, Any]:
    """``GET /v1/models``: one entry per fusion mode."""
    return {"object": "list", "data": [model_card(mode, info, created) for mode in FusionMode]}
