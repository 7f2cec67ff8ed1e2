"""Python clients of the mofserve gRPC API: ``MofServeClient`` (blocking) and
``AsyncMofServeClient`` (asyncio). They import grpc, the generated stubs and numpy only.

    with MofServeClient("127.0.0.1:50051") as client:
        result = client.ask("dog.jpg", "Is the dog facing left or right?", options="(a) Left (b) Right")
        print(result.answer, result.chosen_option, result.timings.total_ms, result.usage.total_tokens)
        for item in client.ask_stream("dog.jpg", "Describe the dog."):  # text as it is generated
            print(item.text if isinstance(item, TokenDelta) else item.finish_reason)

Images are encoded file bytes or a path. ``timeout`` is the call's deadline in seconds (the
server passes what remains of it to Triton). Failures raise ``MofServeError`` with the gRPC
status ``code`` and the server's message, which names the offending field first; a busy server's
RESOURCE_EXHAUSTED carries ``retry_after_s``.

Secured servers: ``token=`` (default: ``$MOFSERVE_AUTH_TOKEN``) is sent as ``authorization:
Bearer <token>`` on every call; ``root_certificates=`` (PEM bytes or a path) or ``tls=True``
(the system's roots) dial TLS.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mofserve.v1 import mofserve_pb2 as pb
from mofserve.v1 import mofserve_pb2_grpc as pb_grpc

from .results import AskResult, EmbedResult, EncodeResult, ServerInfo, TextEmbedResult, TokenDelta, stream_item

ImageLike = bytes | bytearray | memoryview | str | os.PathLike
ModeLike = str | tuple[str, float | None]

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MODE = "interleaved"
ALL_MODES = ("clip", "dinov2", "additive", "interleaved")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MofServe"].full_name
TOKEN_ENV = "MOFSERVE_AUTH_TOKEN"  # the bearer token, when not given (the server reads the same variable)
RETRY_AFTER_TRAILER = "retry-after-ms"

# UNAVAILABLE (Triton restarting, server not up yet) is retried a few times with backoff; every
# RPC here is a read, so a retry is safe.
_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": SERVICE_NAME}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]})


class MofServeError(Exception):
    """A call the server (or the channel) refused; ``code`` is a ``grpc.StatusCode``;
    ``retry_after_s`` is the server's advice when it was too busy (trailer ``retry-after-ms``)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> MofServeError:
        code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
        details = error.details() if callable(getattr(error, "details", None)) else str(error)
        trailers = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
        retry_ms = dict(trailers or ()).get(RETRY_AFTER_TRAILER)
        try:
            retry_after_s = int(retry_ms) / 1e3 if retry_ms is not None else None
        except ValueError:
            retry_after_s = None
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", retry_after_s)


def read_image(image: ImageLike) -> bytes:
    """Encoded image bytes from bytes or a file path."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    return Path(image).read_bytes()


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata carrying ``token`` (default ``$MOFSERVE_AUTH_TOKEN``; "" sends none)."""
    token = os.environ.get(TOKEN_ENV) if token is None else token
    return (("authorization", f"Bearer {token.strip()}"),) if token and token.strip() else None


def _credentials(tls: bool, root_certificates: bytes | str | os.PathLike | None) -> grpc.ChannelCredentials | None:
    """TLS channel credentials (roots: PEM bytes, a PEM file, or the system's), or None for plaintext."""
    if root_certificates is None and not tls:
        return None
    if root_certificates is not None and not isinstance(root_certificates, bytes):
        root_certificates = Path(root_certificates).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def _channel_options(max_message_bytes: int, retries: bool) -> list[tuple[str, Any]]:
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    if retries:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", _SERVICE_CONFIG)]
    else:
        options.append(("grpc.enable_retries", 0))
    return options


# ---- requests (shared by both clients) -----------------------------------------------------------


def _generation(max_new_tokens: int | None, temperature: float | None, top_p: float | None,
                seed: int | None) -> pb.GenerationParams:
    params = pb.GenerationParams()
    for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("seed", seed)):
        if value is not None:
            setattr(params, name, value)
    return params


def ask_request(image: ImageLike, question: str, options: str | None = None, mode: str = DEFAULT_MODE,
                alpha: float | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                top_p: float | None = None, seed: int | None = None) -> pb.AskRequest:
    request = pb.AskRequest(image=read_image(image), question=question, options=options or "", mode=mode,
                            generation=_generation(max_new_tokens, temperature, top_p, seed))
    if alpha is not None:
        request.alpha = alpha
    return request


def mode_selections(modes: Iterable[ModeLike], alpha: float | None = None) -> list[pb.ModeSelection]:
    """``"clip"`` or ``("additive", 0.5)`` -> ModeSelection; ``alpha`` goes to bare "additive" entries."""
    selections = []
    for entry in modes:
        mode, mode_alpha = (entry, None) if isinstance(entry, str) else entry
        if mode_alpha is None and mode == "additive":
            mode_alpha = alpha
        selection = pb.ModeSelection(mode=mode)
        if mode_alpha is not None:
            selection.alpha = mode_alpha
        selections.append(selection)
    return selections


def compare_request(image: ImageLike, question: str, options: str | None = None,
                    modes: Sequence[ModeLike] = ALL_MODES, alpha: float | None = None,
                    max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                    seed: int | None = None) -> pb.CompareRequest:
    return pb.CompareRequest(image=read_image(image), question=question, options=options or "",
                             modes=mode_selections(modes, alpha),
                             generation=_generation(max_new_tokens, temperature, top_p, seed))


def encode_request(image: ImageLike, mode: str = DEFAULT_MODE, alpha: float | None = None) -> pb.EncodeRequest:
    request = pb.EncodeRequest(image=read_image(image), mode=mode)
    if alpha is not None:
        request.alpha = alpha
    return request


def embed_request(images: Iterable[ImageLike]) -> pb.EmbedRequest:
    if isinstance(images, bytes | bytearray | memoryview | str | os.PathLike):
        raise TypeError("embed: give a list of images (bytes or paths), not a single image")
    return pb.EmbedRequest(images=[read_image(i) for i in images])


def embed_text_request(texts: Iterable[str]) -> pb.EmbedTextRequest:
    if isinstance(texts, str | bytes):
        raise TypeError("embed_text: give a list of texts, not a single string")
    return pb.EmbedTextRequest(texts=list(texts))


def _health_status(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


# ---- the blocking client ----------------------------------------------------------------------------


class MofServeClient:
    """Blocking client; thread-safe (one channel, shared). Use as a context manager or ``close()``."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None,
                 max_message_bytes: int = 512 << 20, retries: bool = True,
                 channel: grpc.Channel | None = None, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | os.PathLike | None = None) -> None:
        self.target = target
        self.timeout = timeout  # default deadline of every call, seconds (None: none)
        self._metadata = _auth_metadata(token)
        options = _channel_options(max_message_bytes, retries)
        credentials = _credentials(tls, root_certificates)
        self._channel = channel or (grpc.secure_channel(target, credentials, options=options) if credentials
                                    else grpc.insecure_channel(target, options=options))
        self._stub = pb_grpc.MofServeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> MofServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise MofServeError.from_rpc_error(error) from None

    def ask(self, image: ImageLike, question: str, options: str | None = None, mode: str = DEFAULT_MODE,
            alpha: float | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
            top_p: float | None = None, seed: int | None = None, timeout: float | None = None) -> AskResult:
        request = ask_request(image, question, options, mode, alpha, max_new_tokens, temperature, top_p, seed)
        return AskResult.from_proto(self._call(self._stub.Ask, request, timeout))

    def ask_stream(self, image: ImageLike, question: str, options: str | None = None, mode: str = DEFAULT_MODE,
                   alpha: float | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                   top_p: float | None = None, seed: int | None = None,
                   timeout: float | None = None) -> Iterator[TokenDelta | AskResult]:
        """``ask``, streamed: a ``TokenDelta`` per piece of text as the model writes it, then the
        ``AskResult`` (always last; its ``answer`` is the deltas joined). Stopping early (``break``,
        or closing the generator) cancels the call, and the server stops generating."""
        request = ask_request(image, question, options, mode, alpha, max_new_tokens, temperature, top_p, seed)
        call = self._stub.AskStream(request, timeout=self.timeout if timeout is None else timeout,
                                    metadata=self._metadata)
        try:
            for message in call:
                yield stream_item(message)
        except grpc.RpcError as error:
            raise MofServeError.from_rpc_error(error) from None
        finally:
            call.cancel()  # nothing once the call is over; ends it when the caller stopped early

    def compare(self, image: ImageLike, question: str, options: str | None = None,
                modes: Sequence[ModeLike] = ALL_MODES, alpha: float | None = None,
                max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                seed: int | None = None, timeout: float | None = None) -> list[AskResult]:
        """One answer per mode, in order; the encoders see the image once for all of them."""
        request = compare_request(image, question, options, modes, alpha, max_new_tokens, temperature, top_p, seed)
        return [AskResult.from_proto(a) for a in self._call(self._stub.Compare, request, timeout).answers]

    def encode_result(self, image: ImageLike, mode: str = DEFAULT_MODE, alpha: float | None = None,
                      timeout: float | None = None) -> EncodeResult:
        return EncodeResult.from_proto(self._call(self._stub.Encode, encode_request(image, mode, alpha), timeout))

    def encode(self, image: ImageLike, mode: str = DEFAULT_MODE, alpha: float | None = None,
               timeout: float | None = None):
        """The visual tokens ``[N, H]`` (float32 numpy array) of ``image`` in ``mode``."""
        return self.encode_result(image, mode, alpha, timeout).tokens

    def embed(self, images: Iterable[ImageLike], timeout: float | None = None) -> EmbedResult:
        return EmbedResult.from_proto(self._call(self._stub.Embed, embed_request(images), timeout))

    def embed_text(self, texts: Iterable[str], timeout: float | None = None) -> TextEmbedResult:
        """CLIP text embeddings ``[n, E]`` of ``texts`` (the space of ``embed(...).clip``) and the
        checkpoint's logit scale."""
        return TextEmbedResult.from_proto(self._call(self._stub.EmbedText, embed_text_request(texts), timeout))

    def server_info(self, timeout: float | None = None) -> ServerInfo:
        return ServerInfo.from_proto(self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout))

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The standard health status ("SERVING", "NOT_SERVING", ...) of the server ("") or a service."""
        return _health_status(self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service),
                                         timeout))


# ---- the asyncio client -----------------------------------------------------------------------------


class AsyncMofServeClient:
    """asyncio client with the same methods as ``MofServeClient`` (coroutines). Create and use it
    on one event loop; ``async with`` or ``await close()``."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = None,
                 max_message_bytes: int = 512 << 20, retries: bool = True,
                 channel: grpc.aio.Channel | None = None, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | os.PathLike | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = _auth_metadata(token)
        options = _channel_options(max_message_bytes, retries)
        credentials = _credentials(tls, root_certificates)
        self._channel = channel or (grpc.aio.secure_channel(target, credentials, options=options) if credentials
                                    else grpc.aio.insecure_channel(target, options=options))
        self._stub = pb_grpc.MofServeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncMofServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request, timeout: float | None):
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout,
                                metadata=self._metadata)
        except grpc.RpcError as error:
            raise MofServeError.from_rpc_error(error) from None

    async def ask(self, image: ImageLike, question: str, options: str | None = None, mode: str = DEFAULT_MODE,
                  alpha: float | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, seed: int | None = None, timeout: float | None = None) -> AskResult:
        request = ask_request(image, question, options, mode, alpha, max_new_tokens, temperature, top_p, seed)
        return AskResult.from_proto(await self._call(self._stub.Ask, request, timeout))

    async def ask_stream(self, image: ImageLike, question: str, options: str | None = None,
                         mode: str = DEFAULT_MODE, alpha: float | None = None, max_new_tokens: int | None = None,
                         temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                         timeout: float | None = None) -> AsyncIterator[TokenDelta | AskResult]:
        """``MofServeClient.ask_stream`` as an async iterator (``async for item in client.ask_stream(...)``)."""
        request = ask_request(image, question, options, mode, alpha, max_new_tokens, temperature, top_p, seed)
        call = self._stub.AskStream(request, timeout=self.timeout if timeout is None else timeout,
                                    metadata=self._metadata)
        try:
            async for message in call:
                yield stream_item(message)
        except grpc.RpcError as error:
            raise MofServeError.from_rpc_error(error) from None
        finally:
            call.cancel()

    async def compare(self, image: ImageLike, question: str, options: str | None = None,
                      modes: Sequence[ModeLike] = ALL_MODES, alpha: float | None = None,
                      max_new_tokens: int | None = None, temperature: float | None = None,
                      top_p: float | None = None, seed: int | None = None,
                      timeout: float | None = None) -> list[AskResult]:
        request = compare_request(image, question, options, modes, alpha, max_new_tokens, temperature, top_p, seed)
        return [AskResult.from_proto(a) for a in (await self._call(self._stub.Compare, request, timeout)).answers]

    async def encode_result(self, image: ImageLike, mode: str = DEFAULT_MODE, alpha: float | None = None,
                            timeout: float | None = None) -> EncodeResult:
        response = await self._call(self._stub.Encode, encode_request(image, mode, alpha), timeout)
        return EncodeResult.from_proto(response)

    async def encode(self, image: ImageLike, mode: str = DEFAULT_MODE, alpha: float | None = None,
                     timeout: float | None = None):
        return (await self.encode_result(image, mode, alpha, timeout)).tokens

    async def embed(self, images: Iterable[ImageLike], timeout: float | None = None) -> EmbedResult:
        return EmbedResult.from_proto(await self._call(self._stub.Embed, embed_request(images), timeout))

    async def embed_text(self, texts: Iterable[str], timeout: float | None = None) -> TextEmbedResult:
        response = await self._call(self._stub.EmbedText, embed_text_request(texts), timeout)
        return TextEmbedResult.from_proto(response)

    async def server_info(self, timeout: float | None = None) -> ServerInfo:
        return ServerInfo.from_proto(await self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout))

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        response = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return _health_status(response)
