"""Triton's streaming inference (gRPC ``ModelStreamInfer``): one request, its many responses, and
how a stream is abandoned without ever being cancelled.

Why a module of its own: the ``llm`` model is decoupled (it answers one request with a response
per decode step), and Triton's unary ``ModelInfer`` refuses decoupled models, so every
``vqa_<mode>`` call goes through a stream. Three things about Triton 2.51 shape it (measured here
with a decoupled python model behind an ensemble):

* **The end of a stream is the end of its RPC.** Each request gets a stream of its own, sent
  and half-closed at once; Triton then ends the RPC (status OK) after that request's last
  response. A response flagged ``triton_final_response`` (asked for with the request parameter
  ``triton_enable_empty_final_response``; tritonclient's asyncio ``stream_infer`` cannot send it,
  its ``triton_`` parameters are reserved, hence the request built here) says so earlier, but
  request-level errors (an unknown model, an unexpected input) carry no flag: only the RPC's end
  is certain. An error inside an ensemble comes back as one error response flagged final.
* **Error responses carry no status code**, only Triton's text ("in ensemble 'vqa_clip', image:
  ...": ``errors.triton_error``, the one function that reads an error's text, turns it into data,
  code, field and message; the ``llm`` model sends its own errors as data instead, ``ERROR_CODE``
  and ``ERROR_MESSAGE``). This module hands that text over untouched (``StreamResponse.error``).
* **A stream is never cancelled**: cancelling an in-flight gRPC call can crash Triton 2.51
  (triton-inference-server/server#7368, fixed in 24.12). A caller that goes away abandons its
  ``TritonStream`` (its responses are dropped) while a task keeps reading it to the end, and asks
  the model to stop through a second stream (``send_cancel``: ``REQUEST_ID`` + ``CANCEL`` to
  ``llm``), which frees the batch slot; both tasks are tracked by the engine like its other
  detached calls. So no call of this module sets a gRPC deadline either. A cancel that reaches
  ``llm`` before the sequence does (the question was still in the encoders) finds nothing to end,
  so the abandoned stream's first later response (the sequence has started) sends it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from mofserve.core import tensors as T

from .errors import EngineError, triton_status_code

LOGGER = logging.getLogger(__name__)

#: Request parameter: Triton flags a request's last response (``FINAL_RESPONSE``), sending an
#: empty one if the model's last response was empty.
EMPTY_FINAL_PARAMETER = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"


def channel_args() -> list[tuple[str, int]]:
    """Options of every channel to Triton (unary calls and streams): tritonclient's own, plus two
    that make a restarted Triton reachable at once.

    gRPC shares subchannels between channels to the same address; one that failed to connect while
    Triton was down stays in reconnect backoff (growing to 120 s), so a fresh channel (``reconnect``)
    inherited it and failed fast with "failed to connect to all addresses" long after Triton was back
    (seen here under load). A private subchannel pool makes ``reconnect`` dial afresh, and the backoff
    is capped at 1 s for the channel in use."""
    keepalive = triton.KeepAliveOptions()
    return [("grpc.max_send_message_length", triton.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", triton.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 1000)]


@dataclass(frozen=True)
class Input:
    """One input tensor of a request (batch axis included)."""

    name: str
    array: np.ndarray
    datatype: str  # Triton's: "BYTES", "FP32", "INT32", "INT64", "BOOL"

    @classmethod
    def text(cls, name: str, values: Sequence[bytes]) -> Input:
        """A ``TYPE_STRING [1]`` input, one row per value."""
        return cls(name, np.array([[v] for v in values], dtype=object), "BYTES")

    @classmethod
    def scalar(cls, name: str, value: float | int | bool, datatype: str) -> Input:
        """A one-row ``[1]`` input of ``datatype``."""
        np_type = {"FP32": np.float32, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}[datatype]
        return cls(name, np.array([[value]], dtype=np_type), datatype)

    def raw(self) -> bytes:
        """The tensor's bytes as Triton reads them (BYTES: length-prefixed; numbers: little-endian)."""
        if self.datatype == "BYTES":
            return serialize_byte_tensor(self.array).item()
        return np.ascontiguousarray(self.array, dtype=self.array.dtype.newbyteorder("<")).tobytes()


def infer_request(model: str, inputs: Sequence[Input], outputs: Sequence[str] | None = None,
                  request_id: str = "") -> service_pb2.ModelInferRequest:
    """A streaming request for ``model``: Triton's own message, with the final response flagged."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for tensor in inputs:
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.array.shape)
        request.raw_input_contents.append(tensor.raw())
    for name in outputs or ():
        request.outputs.add(name=name)
    request.parameters[EMPTY_FINAL_PARAMETER].bool_param = True
    return request


@dataclass(frozen=True)
class StreamResponse:
    """One response of a stream: outputs (``result``) or Triton's error text (for
    ``errors.triton_error``), and whether Triton flagged it as the request's last."""

    result: InferResult | None
    error: str | None
    final: bool


def _response(message: service_pb2.ModelStreamInferResponse) -> StreamResponse:
    parameter = message.infer_response.parameters.get(FINAL_RESPONSE)
    final = bool(parameter is not None and parameter.bool_param)
    if message.error_message:
        return StreamResponse(None, message.error_message, final)
    return StreamResponse(InferResult(message.infer_response), None, final)


async def _once(request: service_pb2.ModelInferRequest) -> AsyncIterator[service_pb2.ModelInferRequest]:
    yield request  # then the iterator ends: the client half-closes, Triton ends the RPC when done


class TritonStream:
    """The responses to one request, read to the end of its RPC by a task of its own.

    ``next`` hands them over one at a time. ``abandon`` stops handing them over (they are
    dropped) while the task still reads the stream to its end: the RPC is never cancelled. The
    task is added to ``detached`` (and removed when it ends) so that the engine can tell what is
    still in flight.
    """

    def __init__(self, stub: service_pb2_grpc.GRPCInferenceServiceStub, request: service_pb2.ModelInferRequest,
                 detached: set[asyncio.Future], target: str = "triton") -> None:
        self.model = request.model_name
        self.request_id = request.id
        self.target = target
        self.final_seen = False  # a response flagged final arrived (the model is done with it)
        self.ended = False  # the RPC is over: every response has been read
        self.abandoned = False
        self._on_late: Callable[[], object] | None = None  # see abandon
        self._queue: asyncio.Queue[StreamResponse | EngineError | None] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._read(stub, request))
        detached.add(self._task)
        self._task.add_done_callback(detached.discard)

    @property
    def done(self) -> bool:
        """Whether the request needs nothing more from Triton (its final response came, or the RPC ended)."""
        return self.final_seen or self.ended

    async def _read(self, stub: service_pb2_grpc.GRPCInferenceServiceStub,
                    request: service_pb2.ModelInferRequest) -> None:
        failure: EngineError | None = None
        try:
            async for message in stub.ModelStreamInfer(_once(request)):
                response = _response(message)
                self.final_seen = self.final_seen or response.final
                if not self.abandoned:
                    self._queue.put_nowait(response)
                    continue
                if response.error:
                    LOGGER.warning("%s request %s (abandoned): %s", self.model, self.request_id, response.error)
                elif not response.final and self._on_late is not None:
                    on_late, self._on_late = self._on_late, None
                    on_late()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                failure = EngineError("unavailable", f"triton: stream to {self.target} stopped (shutting down)")
                raise  # the loop itself is going away
            # not this task: ``reconnect`` closed the channel under the call after a Triton restart
            failure = EngineError("unavailable", f"triton: connection to {self.target} closed (Triton "
                                                 "restarted); retry")
        except grpc.aio.AioRpcError as error:  # Triton unreachable (UNAVAILABLE), or its stream failed
            # the status of the failed RPC (a response carries only text); one the table does not know,
            # INTERNAL included (a reset connection when Triton dies mid-stream), is "unavailable": retry
            code = triton_status_code(error.code().name, default="unavailable")
            failure = EngineError(code, f"triton: {error.details() or error.code().name} ({self.target})")
        except Exception as error:  # a channel closed before the call started, and the like
            failure = EngineError("unavailable", f"triton: not reachable at {self.target} ({error})")
        finally:
            self.ended = True
            if failure is not None and self.abandoned:
                LOGGER.warning("%s request %s (abandoned): %s", self.model, self.request_id, failure.message)
            if not self.abandoned:
                if failure is not None:
                    self._queue.put_nowait(failure)
                self._queue.put_nowait(None)

    async def next(self, timeout: float | None = None) -> StreamResponse | None:
        """The next response, or None once the stream has ended; raises ``EngineError`` when the
        stream broke and ``TimeoutError`` when nothing came within ``timeout`` seconds."""
        if self.abandoned:
            raise RuntimeError("next: the stream was abandoned")
        if timeout is None:
            item = await self._queue.get()
        else:
            async with asyncio.timeout(max(timeout, 0.0)):
                item = await self._queue.get()
        if isinstance(item, EngineError):
            raise item
        if item is None:
            self._queue.put_nowait(None)  # stays ended for a later call
        return item

    def abandon(self, on_late: Callable[[], object] | None = None) -> None:
        """Drop this stream's responses from now on; its task still reads it to the end.
        ``on_late`` is called (once) if a response that is not the last one still arrives: the
        request is still being worked on (a sequence that a cancel did not find yet)."""
        self.abandoned = True
        self._on_late = on_late
        with contextlib.suppress(asyncio.QueueEmpty):
            while True:
                self._queue.get_nowait()

    def fail(self, error: EngineError) -> None:
        """Hand ``error`` to the reader of ``next`` now (the responses still due will never come)."""
        if not self.abandoned and not self.done:
            self._queue.put_nowait(error)


def cancel_request(request_id: str) -> service_pb2.ModelInferRequest:
    """The request that ends the ``llm`` sequence ``request_id``: one final response, at once."""
    return infer_request(T.LLM, [Input.text(T.REQUEST_ID, [request_id.encode()]), Input.scalar(T.CANCEL, True, "BOOL")],
                         request_id=f"cancel-{request_id}")


def send_cancel(stub: service_pb2_grpc.GRPCInferenceServiceStub, request_id: str,
                detached: set[asyncio.Future], target: str = "triton") -> TritonStream:
    """Ask the ``llm`` model to end the sequence ``request_id`` (``FINISH_REASON`` "cancelled",
    its batch slot freed) through a stream of its own, read to its end in the background."""
    stream = TritonStream(stub, cancel_request(request_id), detached, target)
    stream.abandon()  # nobody waits for its answer; an error is logged
    return stream
