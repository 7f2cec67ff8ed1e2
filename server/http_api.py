"""The HTTP front-end: an OpenAI-compatible aiohttp app over ``TritonEngine``.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/models/{model}``,
``GET /healthz``, ``GET /metrics`` and, when given Triton's metrics URL, ``GET /metrics/triton``
(Triton's own metrics page, relayed: Triton binds loopback, so Prometheus scrapes it here). The
wire format (parsing, responses, errors) lives in ``openai_protocol``; this module reads bodies,
enforces the HTTP-level limits (content type, body size), calls the engine, counts every request
in ``FrontendMetrics`` and answers every failure in OpenAI's error shape. ``start_http`` binds it
(loopback by default).

``stream: true`` is served token by token as Server-Sent Events (``_stream``). Nothing is sent
before the engine's first item (a delta or the whole answer), so an error up to then keeps its
HTTP status and JSON body; one after that is an SSE ``error`` event that ends the stream. A client
that disconnects cancels its handler (``handler_cancellation``), which closes the engine's stream:
the sequence is cancelled in Triton and its batch slot freed, for plain requests too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from . import openai_protocol as P
from .admission import Admission, remaining, retry_after
from .engine import Answer, Delta, EngineError, TritonEngine
from .metrics import CONTENT_TYPE, FrontendMetrics

log = logging.getLogger(__name__)

TRITON_METRICS_TIMEOUT_S = 5.0  # relaying Triton's metrics page (a scrape has ~10 s)
#: Optional request header: the client's deadline in seconds (gRPC clients send a deadline instead);
#: clamped to max_deadline_s, default_deadline_s without it (server/admission.py).
REQUEST_TIMEOUT_HEADER = "X-Request-Timeout"
_DEADLINE = web.RequestKey("mofserve_deadline", float)  # the admitted request's deadline (time.monotonic())
_OFFLOAD_BYTES = 1 << 20  # bodies above this are decoded in a worker thread, off the event loop


def requested_timeout(header: str | None) -> float | None:
    """The request's ``X-Request-Timeout`` in seconds (None: not sent); a value that is not a
    positive number is the caller's error (400)."""
    if header is None:
        return None
    try:
        requested = float(header)
    except ValueError:
        requested = math.nan
    if not (math.isfinite(requested) and requested > 0):
        raise P.ProtocolError(400, f"{REQUEST_TIMEOUT_HEADER.lower()}: must be a positive number of seconds, "
                                   f"got {header!r}")
    return requested


def default_max_body_bytes(max_image_bytes: int) -> int:
    """A body that can carry the largest allowed image base64-encoded, plus 1 MiB for the rest."""
    return (max_image_bytes + 2) // 3 * 4 + (1 << 20)


def error_response(error: P.ProtocolError, retry_after_s: float | None = None) -> web.Response:
    """OpenAI's error shape; 429 and 503 say when to retry (whole seconds, at least 1)."""
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s or 1)))} if error.status in (429, 503) else None
    return web.json_response(P.error_body(error), status=error.status, headers=headers)


class _Frontend:
    def __init__(self, engine: TritonEngine, metrics: FrontendMetrics, max_body_bytes: int,
                 admission: Admission, triton_metrics_url: Callable[[], str | None] | None = None) -> None:
        self.engine = engine
        self.triton_metrics_url = triton_metrics_url
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.admission = admission
        self.created = int(time.time())

    def _count(self, method: str, mode: str, status: str) -> None:
        with self.metrics.track("http", method, mode) as outcome:
            outcome["status"] = status

    # ---- body ------------------------------------------------------------------------------

    async def _read_json(self, request: web.Request) -> tuple[Any, int]:
        """The decoded JSON body and its size in bytes."""
        # request.content_type drops parameters such as charset (and says octet-stream when absent)
        if "Content-Type" not in request.headers or request.content_type != "application/json":
            given = request.headers.get("Content-Type", "none")
            raise P.ProtocolError(415, f"content-type: expected application/json, got {given!r}",
                                  None, "unsupported_media_type")
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise P.ProtocolError(413, f"body: {length} bytes exceeds the limit of {self.max_body_bytes} bytes "
                                       "(max_body_bytes)", None, "too_large", reason="too_large")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise P.ProtocolError(413, f"body: exceeds the limit of {self.max_body_bytes} bytes (max_body_bytes)",
                                  None, "too_large", reason="too_large") from None
        if not raw:
            raise P.ProtocolError(400, "body: empty; send a JSON object", None, "invalid_json")
        try:
            if len(raw) > _OFFLOAD_BYTES:
                return await asyncio.to_thread(json.loads, raw), len(raw)
            return json.loads(raw), len(raw)
        except UnicodeDecodeError as error:
            raise P.ProtocolError(400, f"body: not valid UTF-8 (byte 0x{error.object[error.start]:02x} at offset "
                                       f"{error.start}); send JSON encoded as UTF-8", None, "invalid_json") from None
        except json.JSONDecodeError as error:
            raise P.ProtocolError(400, f"body: invalid JSON ({error})", None, "invalid_json") from None

    # ---- routes ----------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        method = "chat.completions"
        try:
            body, size = await self._read_json(request)
        except P.ProtocolError as error:
            self._count(method, "", error.reason)
            return error_response(error)
        mode = ""
        if isinstance(body, dict):
            with contextlib.suppress(P.ProtocolError):
                mode = P.resolve_model(body.get("model")).value
        chat: P.ChatRequest | None = None
        with self.metrics.track("http", method, mode) as outcome:
            try:
                if size > _OFFLOAD_BYTES:  # base64-decoding a large image: off the event loop
                    chat = await asyncio.to_thread(P.parse_chat_request, body, self.engine.limits)
                else:
                    chat = P.parse_chat_request(body, self.engine.limits)
                if chat.stream:
                    return await self._stream(request, chat, outcome)
                answer = await self.engine.ask(chat.question, chat.selection, timeout=remaining(request[_DEADLINE]))
            except P.ProtocolError as error:
                outcome["status"] = error.reason
                return error_response(error)
            except EngineError as error:
                outcome["status"] = error.code
                if error.code == "internal":
                    log.warning("chat completion failed: %s", error.message)
                return error_response(P.from_engine_error(error, chat.params if chat else None))
            except asyncio.CancelledError:  # the client disconnected (its sequence is cancelled in Triton)
                outcome["status"] = "cancelled"
                raise
            self.metrics.observe_answer("http", answer)
            return web.json_response(P.chat_completion(chat, answer, self.engine.info, ident=P.completion_id(),
                                                       created=int(time.time())))

    async def _stream(self, request: web.Request, chat: P.ChatRequest, outcome: dict[str, str]) -> web.StreamResponse:
        """``stream: true``: a ``chat.completion.chunk`` per piece of text as the model writes it.

        The engine's first item is awaited before the response starts, so that errors up to then
        (validation in Triton, the deadline, a busy or absent Triton) are raised to the caller and
        keep their HTTP status. After that, an ``EngineError`` is sent as an SSE ``error`` event; a
        client gone (a write fails) ends the handler. Leaving the ``aclosing`` block early closes
        the engine's stream, which cancels the sequence in Triton."""
        stream = self.engine.ask_stream(chat.question, chat.selection, timeout=remaining(request[_DEADLINE]))
        async with contextlib.aclosing(stream):
            item: Delta | Answer = await anext(stream)
            chunks = P.ChunkStream(chat, ident=P.completion_id(), created=int(time.time()))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                await response.write(P.sse(chunks.start()))
                while isinstance(item, Delta):
                    await response.write(P.sse(chunks.content(item.text)))
                    item = await anext(stream)
                self.metrics.observe_answer("http", item)
                for chunk in chunks.finish(item, self.engine.info):
                    await response.write(P.sse(chunk))
                await response.write(P.SSE_DONE)
            except EngineError as error:
                outcome["status"] = error.code
                if error.code == "internal":
                    log.warning("chat completion stream failed: %s", error.message)
                with contextlib.suppress(ConnectionError):
                    await response.write(P.sse_error(P.from_engine_error(error, chat.params)))
            except ConnectionError:  # the client went away mid-stream (the write failed)
                outcome["status"] = "cancelled"
                return response
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    async def admitted_chat_completions(self, request: web.Request) -> web.StreamResponse:
        """``chat_completions`` under admission control: a slot (or a fast 429 with ``Retry-After``
        before the body is read) and the request's deadline (``X-Request-Timeout``, clamped, or the
        default), which bounds the queue wait and the Triton call (504 when it passes)."""
        try:
            requested = requested_timeout(request.headers.get(REQUEST_TIMEOUT_HEADER))
        except P.ProtocolError as error:
            self._count("chat.completions", "", error.reason)
            return error_response(error)
        try:
            async with self.admission.admit(requested, "http") as deadline:
                request[_DEADLINE] = deadline
                return await self.chat_completions(request)
        except EngineError as error:  # refused by admission: queue full, or the deadline passed while queued
            self._count("chat.completions", "", error.code)
            return error_response(P.from_engine_error(error), retry_after(error))

    async def models(self, request: web.Request) -> web.Response:
        with self.metrics.track("http", "models"):
            return web.json_response(P.model_list(self.engine.info, self.created))

    async def model(self, request: web.Request) -> web.Response:
        with self.metrics.track("http", "models") as outcome:
            try:
                mode = P.resolve_model(request.match_info["model"])
            except P.ProtocolError as error:
                outcome["status"] = error.reason
                return error_response(error)
            return web.json_response(P.model_card(mode, self.engine.info, self.created))

    async def healthz(self, request: web.Request) -> web.Response:
        with self.metrics.track("http", "healthz") as outcome:
            ready = await self.engine.ready()
            outcome["status"] = "ok" if ready else "unavailable"
            body = {"status": "ok" if ready else "unavailable", "triton": ready, "profile": self.engine.info.profile,
                    "random_weights": self.engine.info.random_weights}
            if not ready:  # why: the supervisor's verdict (a failed probe names the model), else Triton's
                readiness = self.engine.readiness
                body["reason"] = readiness.reason if readiness is not None else "triton: not ready"
            return web.json_response(body, status=200 if ready else 503,
                                     headers=None if ready else {"Retry-After": "1"})

    async def prometheus(self, request: web.Request) -> web.Response:
        with self.metrics.track("http", "metrics"):
            return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def triton_prometheus(self, request: web.Request) -> web.Response:
        """Triton's metrics page (``nv_inference_*``, the models' ``mofserve_*`` counters), relayed."""
        with self.metrics.track("http", "triton_metrics") as outcome:
            url = self.triton_metrics_url() if self.triton_metrics_url is not None else None
            try:
                if url is None:
                    raise aiohttp.ClientError("triton is not started")
                timeout = aiohttp.ClientTimeout(total=TRITON_METRICS_TIMEOUT_S)
                async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as upstream:
                    body, status = await upstream.read(), upstream.status
                    content_type = upstream.headers.get("Content-Type", "text/plain; version=0.0.4")
            except (aiohttp.ClientError, TimeoutError) as error:
                outcome["status"] = "unavailable"
                return web.Response(status=503, text=f"triton metrics unavailable: {error}\n",
                                    headers={"Retry-After": "1"})
            if status != 200:
                outcome["status"] = "unavailable"
            return web.Response(body=body, status=200 if status == 200 else 503,
                                headers={"Content-Type": content_type})

    # ---- everything else -------------------------------------------------------------------

    @web.middleware
    async def errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Router errors (404, 405) and anything unexpected, in OpenAI's error shape."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # aiohttp's own refusals carry no engine code: the metrics count a missing path as not_found,
            # any other as the caller's (invalid_argument) below 500 and ours (internal) above
            reason = "internal" if exc.status >= 500 else "invalid_argument"
            if exc.status == 405:
                allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
                message = f"method: {request.method} is not allowed on {request.path}; use {allowed}"
                code = "method_not_allowed"
            elif exc.status == 404:
                message = (f"path: {request.path} not found; routes: POST /v1/chat/completions, GET /v1/models, "
                           "GET /healthz, GET /metrics")
                code = reason = "not_found"
            else:
                if isinstance(exc, web.HTTPRequestEntityTooLarge):  # a body over client_max_size
                    reason = "too_large"
                message, code = exc.text or exc.reason, reason
            self._count("unmatched", "", reason)
            return error_response(P.ProtocolError(exc.status, message, None, code, reason=reason))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return error_response(P.ProtocolError(500, "internal: unexpected server error (see the server log)",
                                                   None, "internal", reason="internal"))


def build_http_app(engine: TritonEngine, metrics: FrontendMetrics, max_body_bytes: int | None = None,
                   admission: Admission | None = None,
                   triton_metrics_url: Callable[[], str | None] | None = None,
                   middlewares: Sequence = ()) -> web.Application:
    """The OpenAI-compatible app. ``max_body_bytes`` defaults to what carries the engine's largest
    allowed image base64-encoded; larger bodies get a JSON 413. ``triton_metrics_url`` (called per
    scrape: Triton's port survives restarts, but ask anyway) adds ``GET /metrics/triton``.
    ``admission`` (default: its own, with the default limits) is shared with gRPC in ``serve``;
    ``middlewares`` run first, before routing (``security.http_bearer_auth``)."""
    if max_body_bytes is None:
        max_body_bytes = default_max_body_bytes(engine.limits.max_image_bytes)
    frontend = _Frontend(engine, metrics, max_body_bytes, admission or Admission(metrics=metrics), triton_metrics_url)
    app = web.Application(client_max_size=max_body_bytes, middlewares=[*middlewares, frontend.errors])
    app.router.add_post("/v1/chat/completions", frontend.admitted_chat_completions)
    app.router.add_get("/v1/models", frontend.models)
    app.router.add_get("/v1/models/{model}", frontend.model)
    app.router.add_get("/healthz", frontend.healthz)
    app.router.add_get("/metrics", frontend.prometheus)
    if triton_metrics_url is not None:
        app.router.add_get("/metrics/triton", frontend.triton_prometheus)
    return app


async def start_http(app: web.Application, host: str = "127.0.0.1", port: int = 8080,
                     shutdown_timeout_s: float = 60.0, ssl_context: ssl.SSLContext | None = None,
                     ) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (port 0: a free port); returns the runner (``await
    runner.cleanup()`` to stop: it stops listening, then gives in-flight requests up to
    ``shutdown_timeout_s``) and the bound port. ``ssl_context`` serves HTTPS."""
    # handler_cancellation: a client that disconnects cancels its request (and so its sequence in Triton)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout_s, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            bound = int(address[1])
            break
    return runner, bound
