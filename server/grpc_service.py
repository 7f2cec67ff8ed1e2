"""The gRPC front-end: ``mofserve.v1.MofServe`` over ``TritonEngine``, plus health and reflection.

``build_grpc_server`` returns an unstarted ``grpc.aio.Server`` that ``mofserve serve`` composes
with the HTTP app on one asyncio loop. Every RPC

* is counted and timed by ``FrontendMetrics`` (transport "grpc", the method, the fusion mode)
  and, when the ensemble reports them, its per-stage timings are observed;
* passes the caller's remaining deadline to the engine as its Triton timeout, so an expired
  deadline ends the Triton call too;
* maps ``EngineError.code`` to a gRPC status through this transport's own table, ``GRPC_STATUS``,
  with the engine's message (which names the field first), and fails fast with UNAVAILABLE while
  Triton is down (``GrpcHealth.set_serving(False)``);
* answers a request that does not parse (a string field that is not UTF-8, broken framing) with
  INVALID_ARGUMENT naming the field, where python grpc would say UNKNOWN (``_tolerant``).

``AskStream`` writes the answer's text as it is generated, then one final ``AskResponse``; it holds
its admission slot until the stream ends, and a client that cancels it (or whose deadline passes)
ends the generation through the engine (which frees the sequence's batch slot in Triton).

The request size limit is enforced twice: grpc itself rejects a message larger than
``max_message_bytes`` (the engine's image limit plus a margin) with RESOURCE_EXHAUSTED before it
is read, and the engine rejects an image over ``Limits.max_image_bytes`` naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from mofserve.core.tensors import FusionMode
from mofserve.v1 import mofserve_pb2 as pb
from mofserve.v1 import mofserve_pb2_grpc as pb_grpc

from .admission import Admission, remaining, retry_after
from .engine import (
    Answer,
    Delta,
    Embeddings,
    EngineError,
    GenerationParams,
    Question,
    Selection,
    StageTimings,
    TritonEngine,
)
from .info_api.protocol import package_version
from .metrics import FrontendMetrics

LOGGER = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MofServe"].full_name  # "mofserve.v1.MofServe"
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
DEFAULT_MODE = FusionMode.INTERLEAVED  # what an empty `mode` means
#: Room above the largest image for the rest of a request (question, options, framing).
MESSAGE_MARGIN_BYTES = 1 << 20
TRANSPORT = "grpc"
_MODES = frozenset(m.value for m in FusionMode)
#: The gRPC status of each of the engine's error codes (``errors.ERROR_CODES``): this transport's own
#: table (HTTP has ``openai_protocol.HTTP_STATUS``); anything else is INTERNAL.
GRPC_STATUS: dict[str, grpc.StatusCode] = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT, "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED, "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "unavailable": grpc.StatusCode.UNAVAILABLE, "not_found": grpc.StatusCode.NOT_FOUND,
    "internal": grpc.StatusCode.INTERNAL}

R = TypeVar("R")


# ---- health -----------------------------------------------------------------------------------


class GrpcHealth:
    """The serving state of the gRPC front-end, as the standard ``grpc.health.v1`` service reports
    it for the overall server ("") and for ``mofserve.v1.MofServe``.

    ``set_serving`` may be called from the server's event loop (the change is applied by a task it
    returns, which callers may await) or from any other thread (it blocks until applied).
    """

    SERVICES = ("", SERVICE_NAME)

    def __init__(self, servicer: HealthServicer, serving: bool = True) -> None:
        self.servicer = servicer
        self._serving = serving
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[asyncio.Task] = set()
        self._bind_loop()
        self.set_serving(serving)

    @property
    def serving(self) -> bool:
        return self._serving

    def _bind_loop(self) -> None:
        if self._loop is None:
            with contextlib.suppress(RuntimeError):
                self._loop = asyncio.get_running_loop()

    async def _apply(self) -> None:
        """Publishes the latest state (so that quick flips settle on the last one)."""
        status = health_pb2.HealthCheckResponse.SERVING if self._serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in self.SERVICES:
            await self.servicer.set(service, status)

    def set_serving(self, serving: bool) -> asyncio.Future | None:
        self._serving = bool(serving)
        self._bind_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is self._loop:
            task = running.create_task(self._apply())
            self._pending.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._pending.discard)
            return task
        if self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._apply(), self._loop).result(10)
        else:  # no loop yet (built outside one): nothing can be watching, a private loop will do
            asyncio.run(self._apply())
        return None

    async def shutdown(self) -> None:
        """NOT_SERVING for good (the server is stopping)."""
        self._serving = False
        await self.servicer.enter_graceful_shutdown()


# ---- conversions --------------------------------------------------------------------------------


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


def _selection(mode: str, alpha: float | None) -> Selection:
    return Selection.parse(mode or DEFAULT_MODE.value, alpha)


def _mode_label(mode: str) -> str:
    """The metrics label of a requested mode: bounded, whatever the caller sent."""
    if not mode:
        return DEFAULT_MODE.value
    return mode if mode in _MODES else "invalid"


def _generation(message: pb.GenerationParams) -> GenerationParams:
    return GenerationParams(max_new_tokens=_optional(message, "max_new_tokens"),
                            temperature=_optional(message, "temperature"), top_p=_optional(message, "top_p"),
                            seed=_optional(message, "seed"))


def _timings(timings: StageTimings) -> pb.StageTimings:
    return pb.StageTimings(**timings.as_dict())


def _tensor(array: np.ndarray) -> pb.Tensor:
    data = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(data=data.tobytes(), shape=list(data.shape), dtype="float32")


# ---- request parsing ----------------------------------------------------------------------------


class _Undecodable:
    """A request message that did not parse; its handler answers with ``error`` (INVALID_ARGUMENT)."""

    def __init__(self, error: EngineError) -> None:
        self.error = error

    @property
    def message(self) -> str:
        return self.error.message


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[pos]  # IndexError past the end: broken framing
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _non_utf8_field(raw: bytes, descriptor, prefix: str = "") -> EngineError | None:
    """The refusal of the first string field (nested and repeated ones too, e.g. ``modes[1].mode``)
    whose bytes are not UTF-8 (``"question: not valid UTF-8 (...)"``, field ``question``); None if
    there is none or the framing itself is broken. Walks the protobuf wire format, which protobuf's
    own error does not name."""
    seen: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(raw):
            key, pos = _varint(raw, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(raw, pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                size, pos = _varint(raw, pos)
                value, pos = raw[pos:pos + size], pos + size
                fd = descriptor.fields_by_number.get(number)
                if fd is None:
                    continue
                index = seen[number] = seen.get(number, -1) + 1
                name = prefix + fd.name + (f"[{index}]" if fd.is_repeated else "")
                if fd.type == fd.TYPE_STRING:
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError as error:
                        return EngineError.refused(name, f"not valid UTF-8 (byte 0x{value[error.start]:02x} at "
                                                         f"offset {error.start}); string fields must be UTF-8 "
                                                         "(send bytes as bytes)")
                elif fd.type == fd.TYPE_MESSAGE:
                    found = _non_utf8_field(value, fd.message_type, name + ".")
                    if found:
                        return found
            else:
                return None
    except IndexError:
        return None
    return None


def _tolerant(message_class):
    """A request deserializer that never raises: python grpc answers a deserializer's exception with
    UNKNOWN and protobuf's "Error parsing message", naming no field; this hands the handler an
    ``_Undecodable`` with a message that does."""

    def parse(raw: bytes):
        try:
            return message_class.FromString(raw)
        except DecodeError:
            full_name = message_class.DESCRIPTOR.full_name
            return _Undecodable(_non_utf8_field(raw, message_class.DESCRIPTOR) or EngineError(
                "invalid_argument", f"request: not a valid {full_name} message (truncated or corrupt protobuf)"))

    return parse


class MofServeServicer(pb_grpc.MofServeServicer):
    def __init__(self, engine: TritonEngine, metrics: FrontendMetrics, health: GrpcHealth,
                 max_message_bytes: int, admission: Admission | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.health = health
        self.max_message_bytes = max_message_bytes
        self.admission = admission or Admission(metrics=metrics)  # shared with HTTP in `serve`

    # ---- plumbing ----------------------------------------------------------------------------

    def _provenance(self) -> pb.Provenance:
        info = self.engine.info
        return pb.Provenance(profile=info.profile, random_weights=info.random_weights, notice=info.notice,
                             model_versions=dict(info.versions))

    async def _serve(self, context: grpc.aio.ServicerContext, method: str, mode: str,
                     work: Callable[[float | None], Awaitable[R]]) -> R:
        """Runs ``work(timeout)`` under the metrics and turns every failure into a gRPC status."""
        with self.metrics.track(TRANSPORT, method, mode) as outcome:
            if not self.health.serving:
                outcome["status"] = "unavailable"
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "triton: not serving (restarting); retry shortly")
            try:
                # admission: a slot or a fast RESOURCE_EXHAUSTED; the deadline (the caller's, clamped,
                # or the default) bounds the queue wait and the Triton call
                async with self.admission.admit(context.time_remaining(), TRANSPORT) as deadline:
                    return await work(remaining(deadline))
            except EngineError as error:
                outcome["status"] = error.code
                advice = retry_after(error)
                if advice is not None:  # retry advice: ours and gRPC's standard retry pushback
                    ms = str(max(1, math.ceil(advice * 1e3)))
                    context.set_trailing_metadata((("retry-after-ms", ms), ("grpc-retry-pushback-ms", ms)))
                await context.abort(GRPC_STATUS.get(error.code, grpc.StatusCode.INTERNAL), error.message)
            except asyncio.CancelledError:  # the caller went away or its deadline passed
                outcome["status"] = "cancelled"
                raise
            except Exception as error:
                outcome["status"] = "internal"
                LOGGER.exception("grpc %s failed", method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal: {type(error).__name__}: {error}")
        raise AssertionError("unreachable")  # context.abort raises

    def _answer(self, answer: Answer, provenance: pb.Provenance) -> pb.AskResponse:
        self.metrics.observe_answer(TRANSPORT, answer)
        usage = answer.usage
        response = pb.AskResponse(answer=answer.answer, chosen_option=answer.chosen_option,
                                  option_scores=answer.option_scores, timings=_timings(answer.timings),
                                  mode=answer.mode.value, provenance=provenance,
                                  usage=pb.Usage(prompt_tokens=usage.prompt_tokens,
                                                 completion_tokens=usage.completion_tokens,
                                                 total_tokens=usage.total_tokens),
                                  finish_reason=answer.finish_reason)
        if answer.alpha is not None:  # the effective alpha, as the engine decided it
            response.alpha = answer.alpha
        return response

    @staticmethod
    def _question(request) -> Question:
        return Question(image=request.image, question=request.question, options=request.options or None,
                        generation=_generation(request.generation))

    # ---- RPCs --------------------------------------------------------------------------------

    async def Ask(self, request: pb.AskRequest, context) -> pb.AskResponse:
        async def work(timeout: float | None) -> pb.AskResponse:
            selection = _selection(request.mode, _optional(request, "alpha"))
            answer = await self.engine.ask(self._question(request), selection, timeout)
            return self._answer(answer, self._provenance())

        return await self._serve(context, "Ask", _mode_label(request.mode), work)

    async def AskStream(self, request: pb.AskRequest, context: grpc.aio.ServicerContext) -> None:
        """Writes a ``TokenDelta`` per piece of new text, then the final ``AskResponse``.

        The slot (admission) is held until the last message; a client that goes away cancels this
        handler, and closing the engine's stream then cancels the sequence in Triton."""
        async def work(timeout: float | None) -> None:
            selection = _selection(request.mode, _optional(request, "alpha"))
            async with contextlib.aclosing(self.engine.ask_stream(self._question(request), selection,
                                                                  timeout)) as stream:
                async for item in stream:
                    if isinstance(item, Delta):
                        message = pb.AskStreamResponse(delta=pb.TokenDelta(
                            text=item.text, completion_tokens=item.completion_tokens))
                    else:
                        message = pb.AskStreamResponse(final=self._answer(item, self._provenance()))
                    await context.write(message)

        await self._serve(context, "AskStream", _mode_label(request.mode), work)

    async def Compare(self, request: pb.CompareRequest, context) -> pb.CompareResponse:
        async def work(timeout: float | None) -> pb.CompareResponse:
            selections = []
            for i, m in enumerate(request.modes):
                try:
                    selections.append(_selection(m.mode, _optional(m, "alpha")))
                except EngineError as error:  # "mode: ..." -> "modes[1].mode: ...", the field too
                    field = f"modes[{i}].{error.field}" if error.field else f"modes[{i}]"
                    raise EngineError(error.code, f"modes[{i}].{error.message}", field) from None
            answers = await self.engine.compare(self._question(request), selections, timeout)
            provenance = self._provenance()
            return pb.CompareResponse(answers=[self._answer(a, provenance) for a in answers])

        return await self._serve(context, "Compare", "multi", work)

    async def Encode(self, request: pb.EncodeRequest, context) -> pb.EncodeResponse:
        async def work(timeout: float | None) -> pb.EncodeResponse:
            selection = _selection(request.mode, _optional(request, "alpha"))
            tokens = await self.engine.encode(request.image, selection, timeout)
            self.metrics.observe_stages(tokens.mode.value, tokens.timings)
            response = pb.EncodeResponse(tokens=_tensor(tokens.tokens), timings=_timings(tokens.timings),
                                         mode=tokens.mode.value, provenance=self._provenance())
            if tokens.alpha is not None:  # the effective alpha, as the engine decided it
                response.alpha = tokens.alpha
            return response

        return await self._serve(context, "Encode", _mode_label(request.mode), work)

    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        async def work(timeout: float | None) -> pb.EmbedResponse:
            started = time.perf_counter()
            result = await self.engine.embed(list(request.images), timeout)
            response = pb.EmbedResponse(
                embeddings=[pb.ImageEmbedding(clip=_tensor(c), dinov2=_tensor(d))
                            for c, d in zip(result.clip, result.dino, strict=True)],
                total_ms=(time.perf_counter() - started) * 1e3, provenance=self._provenance())
            if len(request.images) == 2:
                response.similarity.CopyFrom(pb.Similarity(
                    clip_cosine=Embeddings.cosine(result.clip[0], result.clip[1]),
                    dinov2_cosine=Embeddings.cosine(result.dino[0], result.dino[1])))
            return response

        return await self._serve(context, "Embed", "", work)

    async def EmbedText(self, request: pb.EmbedTextRequest, context) -> pb.EmbedTextResponse:
        async def work(timeout: float | None) -> pb.EmbedTextResponse:
            started = time.perf_counter()
            result = await self.engine.embed_text(list(request.texts), timeout)
            response = pb.EmbedTextResponse(embeddings=[_tensor(e) for e in result.embeddings],
                                            total_ms=(time.perf_counter() - started) * 1e3,
                                            provenance=self._provenance())
            if result.logit_scale is not None:
                response.logit_scale = result.logit_scale
            return response

        return await self._serve(context, "EmbedText", "", work)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        async def work(timeout: float | None) -> pb.ServerInfo:
            lim = self.engine.limits
            info = pb.ServerInfo(
                version=package_version(), modes=[m.value for m in FusionMode], default_mode=DEFAULT_MODE.value,
                limits=pb.Limits(max_image_bytes=lim.max_image_bytes, max_question_chars=lim.max_question_chars,
                                 max_options_chars=lim.max_options_chars, max_new_tokens=lim.max_new_tokens,
                                 max_compare_modes=lim.max_compare_modes, max_embed_images=lim.max_embed_images,
                                 max_message_bytes=self.max_message_bytes, max_embed_texts=lim.max_embed_texts,
                                 max_text_chars=lim.max_text_chars),
                provenance=self._provenance())
            if self.engine.info.default_alpha is not None:
                info.default_alpha = self.engine.info.default_alpha
            return info

        # answers while Triton is down too: it says what the server is, not whether it is ready
        with self.metrics.track(TRANSPORT, "GetServerInfo", ""):
            return await work(None)


# ---- the server ---------------------------------------------------------------------------------


def _add_servicer(servicer: MofServeServicer, server: grpc.aio.Server) -> None:
    """``add_MofServeServicer_to_server`` with ``_tolerant`` request parsing: every method of the
    service, its request refused with INVALID_ARGUMENT (counted like any other) if it does not parse."""
    service = pb.DESCRIPTOR.services_by_name["MofServe"]

    def handler(name: str):
        behaviour = getattr(servicer, name)

        async def handle(request, context):
            if isinstance(request, _Undecodable):
                async def refuse(timeout: float | None):
                    raise request.error

                return await servicer._serve(context, name, "invalid", refuse)
            return await behaviour(request, context)

        return handle

    handlers = {}
    for method in service.methods:
        # a server-streaming handler is a coroutine that writes with ``context.write``: a client that
        # goes away cancels it wherever it waits, so its engine stream is closed at once
        kind = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = kind(handler(method.name),
                                     request_deserializer=_tolerant(getattr(pb, method.input_type.name)),
                                     response_serializer=getattr(pb, method.output_type.name).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def build_grpc_server(engine: TritonEngine, metrics: FrontendMetrics, host: str = "127.0.0.1", port: int = 50051,
                      max_message_bytes: int | None = None, serving: bool = True,
                      admission: Admission | None = None, credentials: grpc.ServerCredentials | None = None,
                      interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                      ) -> tuple[grpc.aio.Server, int, GrpcHealth]:
    """An unstarted gRPC server with MofServe, health and reflection, bound to ``host:port``.

    Call it on the event loop that will run the server; ``port=0`` picks a free port (the bound
    one is returned). ``max_message_bytes`` (default: the engine's image limit + 1 MiB) caps
    every request message. Returns ``(server, bound_port, health)``: ``await server.start()``,
    ``health.set_serving(bool)`` as Triton goes down and up, ``await server.stop(grace)``.
    ``admission`` (default: its own, with the default limits) is shared with the HTTP front-end
    in ``serve``; ``credentials`` (``security.Security.grpc_credentials``) turn on TLS;
    ``interceptors`` (``security.GrpcBearerAuth``) run before every handler.
    """
    limit = max_message_bytes or engine.limits.max_image_bytes + MESSAGE_MARGIN_BYTES
    server = grpc.aio.server(interceptors=list(interceptors), options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", -1),  # Encode at paper size sends ~24 MB of tokens
        ("grpc.so_reuseport", 0),  # a port already taken is an error, never silently shared
    ])
    health = GrpcHealth(HealthServicer(), serving=serving)
    _add_servicer(MofServeServicer(engine, metrics, health, limit, admission), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = _address(host, port)
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as error:
        raise OSError(f"grpc: cannot bind {address} ({error})") from None
    if not bound:
        raise OSError(f"grpc: cannot bind {address}")
    return server, bound, health
