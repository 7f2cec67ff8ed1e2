"""The front-end's one way to Triton: typed, validated, deadline-bounded calls to the ensembles.

Both transports (gRPC in ``grpc_service``, HTTP in ``http_api``) turn their wire requests into
the dataclasses of ``requests`` and call ``TritonEngine``; nothing else in the front-end spells a
tensor name (but the engine's own parts: ``answers``, ``triton_stream``).
Errors come out as data, ``EngineError(code, message, field)``: a transport-neutral ``code`` (one of
``ERROR_CODES``) that each transport maps to its own status in a table of its own, and the request
``field`` at fault; answers carry the effective alpha (``effective_alpha``), so that no transport
recomputes what the engine decided.

Questions stream: ``ask_stream`` yields the answer's text as the ``llm`` model writes it, then the
whole ``Answer``; ``ask`` (and ``compare``, ``probe``) read the same stream to its end, so there is
one path to the language model. The stream mechanics (never cancelling a Triton call) are in
``triton_stream``, the merging of responses into an answer in ``answers``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import grpc
import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from mofserve.core import tensors as T
from mofserve.core.profiles import get_profile
from mofserve.core.targets import mode_encoders
from mofserve.core.tensors import FusionMode

from .answers import (
    ASK_OUTPUTS,
    TIMING_FIELDS,
    Answer,
    AnswerBuilder,
    Delta,
    Embeddings,
    PatchEmbedding,
    StageTimings,
    TextEmbeddings,
    Tokens,
    Usage,
)
from .errors import ERROR_CODES, EngineError, model_error, triton_error
from .requests import GenerationParams, Limits, Question, Selection, check_image, check_question, check_utf8
from .triton_stream import Input, TritonStream, cancel_request, channel_args, infer_request, send_cancel

__all__ = ["ERROR_CODES", "Answer", "Delta", "Embeddings", "EngineError", "GenerationParams", "Limits", "Question",
           "Selection", "ServingInfo", "StageTimings", "TextEmbeddings", "Tokens", "TritonEngine", "Usage"]

if TYPE_CHECKING:
    from .probe import Readiness

R = TypeVar("R")

@dataclass(frozen=True)
class ServingInfo:
    """What every answer says about where it came from."""

    profile: str
    random_weights: bool
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def notice(self) -> str:
        """The warning every output of a seeded profile carries ("" for real weights)."""
        return f"{self.profile} profile: seeded random weights, answers are not meaningful" \
            if self.random_weights else ""

    @property
    def default_alpha(self) -> float | None:
        """A-MoF's alpha when a request gives none (the profile's; None for an unknown profile)."""
        try:
            return get_profile(self.profile).default_alpha
        except ValueError:
            return None


def _bytes_input(name: str, values: Sequence[bytes]) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(values), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[v] for v in values], dtype=object))
    return tensor


def _scalar_input(name: str, value: float | int, dtype: str) -> triton.InferInput:
    np_type = {"FP32": np.float32, "INT32": np.int32, "INT64": np.int64}[dtype]
    tensor = triton.InferInput(name, [1, 1], dtype)
    tensor.set_data_from_numpy(np.array([[value]], dtype=np_type))
    return tensor


def _timings(result, started: float) -> StageTimings:
    timings = StageTimings(total_ms=(time.perf_counter() - started) * 1e3)
    for name, attr in TIMING_FIELDS.items():
        array = result.as_numpy(name)
        if array is not None:
            setattr(timings, attr, float(np.asarray(array).reshape(-1)[0]))
    return timings


def _encoders(mode: FusionMode) -> frozenset[str]:
    return frozenset(mode_encoders(mode))


def _covering_wave(selections: Sequence[Selection]) -> list[int]:
    """Indices of the modes to run first so that each needed encoder runs once for the image."""
    needed = frozenset().union(*(_encoders(s.mode) for s in selections))
    for i, s in enumerate(selections):
        if _encoders(s.mode) == needed:
            return [i]
    # no mode uses every needed encoder: one mode per encoder, side by side (they share none)
    return [next(i for i, s in enumerate(selections) if _encoders(s.mode) == frozenset({e})) for e in sorted(needed)]


class TritonEngine:
    """Async calls to the Triton ensembles over gRPC (loopback)."""

    def __init__(self, triton_url: str, info: ServingInfo, limits: Limits | None = None,
                 max_batch_size: int = 8) -> None:
        self.triton_url = triton_url
        self.info = info
        self.limits = limits or Limits()
        self.max_batch_size = max_batch_size  # the ensembles' max_batch_size: larger calls are split
        self._client: triton.InferenceServerClient | None = None
        # streams (ModelStreamInfer) go through a channel of their own: tritonclient's asyncio
        # client cannot ask for the final-response flag (see triton_stream)
        self._channel: grpc.aio.Channel | None = None
        self._stub: service_pb2_grpc.GRPCInferenceServiceStub | None = None
        self._io: dict[str, tuple[frozenset[str], frozenset[str]]] = {}  # model -> (inputs, outputs), see _model_io
        self._logit_scale: tuple[float | None] | None = None  # embed_text's parameter, asked once
        # Triton calls and streams in flight, abandoned ones included (see _infer, ask_stream)
        self._detached: set[asyncio.Future] = set()
        self._live: set[TritonStream] = set()  # streams a caller is reading (see _llm_died)
        # the supervisor's verdict (server/probe.py); None: ask Triton (see ready)
        self.readiness: Readiness | None = None

    @property
    def client(self) -> triton.InferenceServerClient:
        if self._client is None:
            self._client = triton.InferenceServerClient(self.triton_url, channel_args=channel_args())
        return self._client

    @property
    def stream_stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        """Triton's gRPC service on the streams' channel (opened on first use)."""
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.triton_url, options=channel_args())
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    @property
    def in_flight(self) -> int:
        """Triton calls and streams not finished yet, those whose callers went away included."""
        return len(self._detached)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()
        self._io.clear()
        self._logit_scale = None

    async def reconnect(self) -> None:
        """Drop the channel (after Triton restarts) so the next call dials afresh, not after a backoff."""
        await self.close()

    async def ready(self) -> bool:
        """Whether to take requests. With a supervisor's ``readiness`` attached, its verdict (Triton
        running and the last real probe inference answered): Triton's own ``is_server_ready`` stays
        true while a python-backend stub is dead. Without one, Triton's word."""
        if self.readiness is not None:
            return self.readiness.ready
        try:
            return bool(await self.client.is_server_ready(client_timeout=2.0))
        except Exception:
            return False

    # ---- validation ------------------------------------------------------------------------

    def effective_alpha(self, selection: Selection) -> float | None:
        """The alpha the fusion of ``selection`` uses: the request's, or for ``additive`` the
        profile's default (what the fuse model applies when no ``ALPHA`` is sent); None for the
        modes that do not mix. Decided here, once, and carried by the answer, so that both
        transports report the same value."""
        if selection.mode is not FusionMode.ADDITIVE:
            return None
        return selection.alpha if selection.alpha is not None else self.info.default_alpha

    def _check_image(self, image: bytes, field_name: str = "image") -> None:
        check_image(image, self.limits, field_name)

    def _check_question(self, q: Question) -> None:
        check_question(q, self.limits)

    # ---- calls -----------------------------------------------------------------------------

    async def _model_io(self, model: str, timeout: float | None) -> tuple[frozenset[str], frozenset[str]]:
        """The input and output names of ``model`` (asked once): timings exist only for the stages a
        mode runs and only where python-backend models emit them, so requests ask for the ones it
        has; and a repository built before streaming has no ``REQUEST_ID`` to send."""
        names = self._io.get(model)
        if names is None:
            metadata = await self.client.get_model_metadata(model, client_timeout=timeout)
            names = self._io[model] = (frozenset(i.name for i in metadata.inputs),
                                       frozenset(o.name for o in metadata.outputs))
        return names

    async def _infer(self, model: str, inputs, outputs: Sequence[str] | None, timeout: float | None):
        """One Triton inference, bounded by ``timeout`` seconds.

        The inference itself is never cancelled: Triton 2.51's gRPC endpoint can crash (SIGSEGV in
        TRITONBACKEND_ResponseSend) when an in-flight request is cancelled, which a Triton client
        deadline or a caller that goes away would do (triton-inference-server/server#7368, fixed
        in 24.12). So the deadline is enforced here instead: the caller stops waiting (with
        ``deadline_exceeded``, or its own cancellation) while the call completes in the background
        and its result is dropped; Triton's python models would finish the work anyway.
        """
        if timeout is not None and timeout <= 0:
            raise EngineError("deadline_exceeded", "deadline: expired before the request reached Triton")
        started = time.monotonic()
        try:
            if outputs:
                _, available = await self._model_io(model, timeout)
                outputs = [n for n in outputs if n in available or not T.is_timing(n)]
            requested = [triton.InferRequestedOutput(n) for n in outputs] if outputs else None
            call = asyncio.ensure_future(self.client.infer(model, inputs, outputs=requested))
            self._detached.add(call)
            call.add_done_callback(self._settle)
            left = None if timeout is None else max(timeout - (time.monotonic() - started), 0.0)
            try:
                return await asyncio.wait_for(asyncio.shield(call), left)
            except TimeoutError:
                raise EngineError("deadline_exceeded", f"deadline: {model} did not answer within "
                                                       f"{timeout:.3f} s") from None
        except EngineError:
            raise
        except InferenceServerException as error:
            raise triton_error(error.message() or str(error), str(error.status())) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the caller went away (or its deadline passed)
            # not the caller: ``reconnect`` closed the channel under the call after a Triton restart
            raise EngineError("unavailable", f"triton: connection to {self.triton_url} closed (Triton "
                                             "restarted); retry") from None
        except Exception as error:  # connection refused, channel closed while Triton restarts
            raise EngineError("unavailable", f"triton: not reachable at {self.triton_url} ({error})") from None

    def _settle(self, call: asyncio.Future) -> None:
        """Forget a finished Triton call; read its error so that an abandoned one is not reported."""
        self._detached.discard(call)
        if not call.cancelled():
            call.exception()

    def _ask_inputs(self, q: Question, selection: Selection) -> list[Input]:
        inputs = [Input.text(T.IMAGE, [q.image]), Input.text(T.QUESTION, [q.question.encode()])]
        if q.options and q.options.strip():
            inputs.append(Input.text(T.OPTIONS, [q.options.encode()]))
        if selection.alpha is not None:
            inputs.append(Input.scalar(T.ALPHA, selection.alpha, "FP32"))
        g = q.generation
        for name, value, dtype in ((T.MAX_NEW_TOKENS, g.max_new_tokens, "INT32"),
                                   (T.TEMPERATURE, g.temperature, "FP32"), (T.TOP_P, g.top_p, "FP32"),
                                   (T.SEED, g.seed, "INT64")):
            if value is not None:
                inputs.append(Input.scalar(name, value, dtype))
        return inputs

    async def _checked(self, call: Awaitable[R]) -> R:
        """A Triton metadata or config call, its failures as ``EngineError``."""
        try:
            return await call
        except InferenceServerException as error:
            raise triton_error(error.message() or str(error), str(error.status())) from None
        except Exception as error:  # connection refused, channel closed while Triton restarts
            raise EngineError("unavailable", f"triton: not reachable at {self.triton_url} ({error})") from None

    def _llm_died(self, error: EngineError) -> None:
        """When ``error`` says the ``llm`` stub is dead, fail every stream being read, as unavailable:
        Triton 2.51 never ends the sequences a dead decoupled stub was running (measured: no final
        response, no error), so their callers would wait out their deadlines. The supervisor's
        probe (``ping_llm``) finds a dead stub within a second; Triton is then restarted."""
        if error.code == "unavailable" and f"'{T.LLM}_" in error.message and "is not healthy" in error.message:
            for stream in list(self._live):
                stream.fail(EngineError("unavailable", f"llm: {error.message} (answers in progress are lost); "
                                                       "retry"))

    async def ping_llm(self, timeout: float | None = None) -> None:
        """A round trip to the ``llm`` model itself: a CANCEL for a sequence that does not exist,
        answered at once; ``EngineError`` if the model does not answer (a dead stub: see
        ``_llm_died``). Nothing to do for a repository whose ``llm`` does not stream."""
        inputs, _ = await self._checked(self._model_io(T.LLM, timeout))
        if T.CANCEL not in inputs:
            return
        stream = TritonStream(self.stream_stub, cancel_request(f"ping-{uuid.uuid4().hex}"), self._detached,
                              self.triton_url)
        try:
            while (response := await stream.next(timeout)) is not None:
                if response.error is not None:
                    error = triton_error(response.error)
                    self._llm_died(error)
                    raise error
                if response.final:
                    return
        except TimeoutError:
            raise EngineError("deadline_exceeded", f"deadline: {T.LLM} did not answer within {timeout:.3f} s") from None
        finally:
            if not stream.done:
                stream.abandon()

    async def ask_stream(self, q: Question, selection: Selection,
                         timeout: float | None = None) -> AsyncIterator[Delta | Answer]:
        """One question, answered as the model writes it: a ``Delta`` per new piece of text, then
        the whole ``Answer`` (always last). Read it to the end or close it (``contextlib.aclosing``).

        The request carries a fresh ``REQUEST_ID``. When the caller stops reading early (it went
        away, or closed the iterator) or ``timeout`` seconds pass first (``deadline_exceeded``),
        the engine asks ``llm`` to cancel that sequence, which frees its batch slot, and reads the
        abandoned Triton stream to its end in the background: a Triton call is never cancelled
        (``triton_stream``). Validation errors come before anything reaches Triton.
        """
        self._check_question(q)
        if timeout is not None and timeout <= 0:
            raise EngineError("deadline_exceeded", "deadline: expired before the request reached Triton")
        deadline = None if timeout is None else time.monotonic() + timeout
        model = T.vqa_model(selection.mode)
        started = time.perf_counter()
        inputs, available = await self._checked(self._model_io(model, timeout))
        request_id = uuid.uuid4().hex if T.REQUEST_ID in inputs else ""
        request = self._ask_inputs(q, selection)
        if request_id:
            request.append(Input.text(T.REQUEST_ID, [request_id.encode()]))
        outputs = [n for n in ASK_OUTPUTS if n in available]
        stream = TritonStream(self.stream_stub, infer_request(model, request, outputs, request_id), self._detached,
                              self.triton_url)
        builder = AnswerBuilder(started)
        self._live.add(stream)
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                try:
                    response = await stream.next(left)
                except TimeoutError:
                    raise EngineError("deadline_exceeded", f"deadline: {model} did not finish within "
                                                           f"{timeout:.3f} s") from None
                if response is None:  # the RPC ended
                    break
                if response.error is not None:
                    error = triton_error(response.error)
                    self._llm_died(error)
                    raise error
                delta = builder.add(response.result)
                if delta is not None:
                    yield delta
                if response.final:
                    break
        finally:
            self._live.discard(stream)
            if not stream.done:  # the caller went away, its deadline passed, or an error came mid-stream
                cancel = (lambda: send_cancel(self.stream_stub, request_id, self._detached, self.triton_url)) \
                    if request_id else None
                stream.abandon(on_late=cancel)  # a cancel sent before the sequence started is sent again
                if cancel is not None:
                    cancel()
        if builder.error is not None:
            raise model_error(*builder.error)
        if builder.finish_reason == "cancelled":  # not by this caller: the server is stopping the sequence
            raise EngineError("unavailable", f"llm: the sequence was cancelled by the server ({model}); retry")
        yield builder.answer(selection.mode, self.effective_alpha(selection))

    async def ask(self, q: Question, selection: Selection, timeout: float | None = None) -> Answer:
        """The whole answer (``ask_stream`` read to its end)."""
        async with aclosing(self.ask_stream(q, selection, timeout)) as stream:
            async for item in stream:
                if isinstance(item, Answer):
                    return item
        raise EngineError("internal", f"{T.vqa_model(selection.mode)}: the stream ended without an answer")

    async def compare(self, q: Question, selections: Sequence[Selection], timeout: float | None = None) -> list[Answer]:
        """One image, several modes, answers in the order asked. A first wave computes every encoder
        the modes need exactly once (one mode that uses both encoders, or one CLIP-only and one
        DINOv2-only mode side by side); the other modes then find the image's features in the
        encoders' cache and run side by side."""
        if not selections:
            raise EngineError.refused("modes", "give at least one fusion mode")
        if len(selections) > self.limits.max_compare_modes:
            raise EngineError.refused("modes", f"{len(selections)} exceeds the limit of "
                                               f"{self.limits.max_compare_modes} (max_compare_modes)")
        self._check_question(q)
        deadline = None if timeout is None else time.monotonic() + timeout
        remaining = lambda: None if deadline is None else deadline - time.monotonic()  # noqa: E731
        first_wave = _covering_wave(selections)
        answers: dict[int, Answer] = {}
        for wave in (first_wave, [i for i in range(len(selections)) if i not in first_wave]):
            results = await asyncio.gather(*(self.ask(q, selections[i], remaining()) for i in wave))
            answers.update(zip(wave, results, strict=True))
        return [answers[i] for i in range(len(selections))]

    async def encode(self, image: bytes, selection: Selection, timeout: float | None = None) -> Tokens:
        self._check_image(image)
        inputs = [_bytes_input(T.IMAGE, [image])]
        if selection.alpha is not None:
            inputs.append(_scalar_input(T.ALPHA, selection.alpha, "FP32"))
        started = time.perf_counter()
        result = await self._infer(T.tokens_model(selection.mode), inputs,
                                   [T.VISUAL_TOKENS, *TIMING_FIELDS], timeout)
        tokens = np.ascontiguousarray(result.as_numpy(T.VISUAL_TOKENS)[0], dtype=np.float32)
        return Tokens(selection.mode, self.effective_alpha(selection), tokens, _timings(result, started))

    async def embed(self, images: Sequence[bytes], timeout: float | None = None) -> Embeddings:
        if not images:
            raise EngineError.refused("images", "give at least one image")
        if len(images) > self.limits.max_embed_images:
            raise EngineError.refused("images", f"{len(images)} exceeds the limit of "
                                                f"{self.limits.max_embed_images} (max_embed_images)")
        for i, image in enumerate(images):
            self._check_image(image, f"images[{i}]")
        chunks = [list(images[i:i + self.max_batch_size]) for i in range(0, len(images), self.max_batch_size)]
        results = await asyncio.gather(*(self._infer(T.EMBED, [_bytes_input(T.IMAGE, chunk)],
                                                     [T.CLIP_EMBEDS, T.DINO_CLS], timeout) for chunk in chunks))
        return Embeddings(np.concatenate([r.as_numpy(T.CLIP_EMBEDS) for r in results]),
                          np.concatenate([r.as_numpy(T.DINO_CLS) for r in results]))

    async def embed_patches(self, image: bytes, timeout: float | None = None,
                            field: str = "image") -> PatchEmbedding:
        """Both encoders' pooled embeddings and patch features of one image (the ``embed`` ensemble).
        ``field`` names the image in errors (``images[1]`` for the second of a pair), as data."""
        self._check_image(image, field)
        started = time.perf_counter()
        try:
            result = await self._infer(T.EMBED, [_bytes_input(T.IMAGE, [image])],
                                       [T.CLIP_EMBEDS, T.DINO_CLS, T.CLIP_FEATURES, T.DINO_FEATURES,
                                        *TIMING_FIELDS], timeout)
        except EngineError as error:
            if error.field != "image":
                raise
            message = field + error.message[len("image"):] if error.message.startswith("image:") else error.message
            raise EngineError(error.code, message, field) from None
        outputs = {name: result.as_numpy(name) for name in (T.CLIP_EMBEDS, T.DINO_CLS, T.CLIP_FEATURES,
                                                            T.DINO_FEATURES)}
        missing = [name for name, array in outputs.items() if array is None]
        if missing:
            raise EngineError("internal", f"embed: no {', '.join(missing)} in Triton's answer")
        return PatchEmbedding(*(np.asarray(a[0], dtype=np.float32) for a in outputs.values()),
                              timings=_timings(result, started))

    async def _embed_text_logit_scale(self, timeout: float | None) -> float | None:
        """``exp(logit_scale)`` of the served CLIP checkpoint: a parameter of the ``embed_text`` config."""
        if self._logit_scale is None:
            if timeout is not None and timeout <= 0:
                raise EngineError("deadline_exceeded", "deadline: expired before the request reached Triton")
            response = await self._checked(self.client.get_model_config(T.EMBED_TEXT, client_timeout=timeout))
            parameter = response.config.parameters.get(T.LOGIT_SCALE_PARAMETER)
            self._logit_scale = (float(parameter.string_value) if parameter is not None else None,)
        return self._logit_scale[0]

    async def embed_text(self, texts: Sequence[str], timeout: float | None = None) -> TextEmbeddings:
        """CLIP text embeddings of ``texts`` (tokenised in Triton with the checkpoint's tokenizer,
        padded or truncated to CLIP's 77-token context), in order."""
        if not texts:
            raise EngineError.refused("texts", "give at least one text")
        if len(texts) > self.limits.max_embed_texts:
            raise EngineError.refused("texts", f"{len(texts)} exceeds the limit of "
                                               f"{self.limits.max_embed_texts} (max_embed_texts)")
        for i, text in enumerate(texts):
            if not text.strip():
                raise EngineError.refused(f"texts[{i}]", "empty; send the text to embed")
            check_utf8(text, f"texts[{i}]")
            if len(text) > self.limits.max_text_chars:
                raise EngineError.refused(f"texts[{i}]", f"{len(text)} characters exceeds the limit of "
                                                         f"{self.limits.max_text_chars} (max_text_chars)")
        started = time.monotonic()
        scale = await self._embed_text_logit_scale(timeout)
        if timeout is not None:
            timeout -= time.monotonic() - started
        chunks = [list(texts[i:i + self.max_batch_size]) for i in range(0, len(texts), self.max_batch_size)]
        results = await asyncio.gather(*(self._infer(T.EMBED_TEXT, [_bytes_input(T.TEXT, [t.encode() for t in chunk])],
                                                     [T.TEXT_EMBEDS], timeout) for chunk in chunks))
        return TextEmbeddings(np.concatenate([r.as_numpy(T.TEXT_EMBEDS) for r in results]), scale)
