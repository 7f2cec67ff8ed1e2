"""aiohttp route of ``POST /v1/mofserve/similarity``: body limits, admission, metrics, errors in
OpenAI's shape (the same rules as ``/v1/chat/completions``: 415 for a body that is not JSON, 413
over ``max_body_bytes`` (both images together) or an image over ``max_image_bytes``, 429 with
``Retry-After`` when the shared admission queue is full, ``X-Request-Timeout`` for a deadline)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from mofserve.server import openai_protocol as P
from mofserve.server.admission import Admission, remaining, retry_after
from mofserve.server.engine import EngineError, TritonEngine
from mofserve.server.http_api import REQUEST_TIMEOUT_HEADER, default_max_body_bytes, error_response, requested_timeout
from mofserve.server.metrics import FrontendMetrics

from . import protocol, serving

log = logging.getLogger(__name__)
PATH = "/v1/mofserve/similarity"
METHOD = "similarity"
#: the engine names an image of the pair by its place in the body (data, ``EngineError.field``)
_IMAGE_PARAMS = {f"images[{i}]": f"images[{i}]" for i in range(2)}


async def read_json(request: web.Request, max_body_bytes: int) -> Any:
    if "Content-Type" not in request.headers or request.content_type != "application/json":
        raise P.ProtocolError(415, "content-type: expected application/json, got "
                                   f"{request.headers.get('Content-Type', 'none')!r}", None, "unsupported_media_type")
    too_large = P.ProtocolError(413, f"body: exceeds the limit of {max_body_bytes} bytes (max_body_bytes; both "
                                     "images together)", None, "too_large", reason="too_large")
    if request.content_length is not None and request.content_length > max_body_bytes:
        raise too_large
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    if not raw:
        raise P.ProtocolError(400, "body: empty; send a JSON object", None, "invalid_json")
    try:
        return await asyncio.to_thread(json.loads, raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise P.ProtocolError(400, f"body: invalid JSON ({error})", None, "invalid_json") from None


def add_similarity_routes(app: web.Application, engine: TritonEngine, metrics: FrontendMetrics, admission: Admission,
                          *, max_body_bytes: int | None = None, image_size: int | None = None,
                          aspect: str | None = None) -> None:
    """Adds ``POST /v1/mofserve/similarity`` to ``app`` (before it starts). ``max_body_bytes``: the
    HTTP app's limit (the default: ``http_api``'s, from the engine's image limit)."""
    if max_body_bytes is None:
        max_body_bytes = default_max_body_bytes(engine.limits.max_image_bytes)

    async def handle(request: web.Request) -> web.Response:
        with metrics.track("http", METHOD) as outcome:
            try:
                requested = requested_timeout(request.headers.get(REQUEST_TIMEOUT_HEADER))
                async with admission.admit(requested, "http") as deadline:
                    body = await read_json(request, max_body_bytes)
                    parsed = protocol.parse_request(body, engine.limits)
                    result = await serving.similarity(engine, parsed.images, remaining(deadline))
            except P.ProtocolError as error:
                outcome["status"] = error.reason
                return error_response(error)
            except EngineError as error:
                outcome["status"] = error.code
                if error.code == "internal":
                    log.warning("similarity failed: %s", error.message)
                return error_response(P.from_engine_error(error, _IMAGE_PARAMS), retry_after(error))
            return web.json_response(protocol.similarity_response(parsed, result, engine.info, image_size=image_size,
                                                                  aspect=aspect))

    app.router.add_post(PATH, handle)
