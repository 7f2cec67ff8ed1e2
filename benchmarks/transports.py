"""The two ways ``mofserve bench load`` talks to a front-end: gRPC (``AsyncMofServeClient``: ``Ask``,
or ``AskStream`` with ``LoadConfig.stream``) and HTTP (aiohttp, the OpenAI-compatible ``POST
/v1/chat/completions``). Only the address given is contacted; a failure raises ``RequestFailed``
with a code (gRPC status name, ``"<status> <error.code>"``, ``client_timeout``, ...).

``ask(index, mode)`` returns what the load runner records of an answer: ``timings`` (the server's
stage times, ms), ``completion_tokens`` / ``prompt_tokens`` (the usage, when the server reports it)
and, for a streamed answer, ``deltas``: ``[ms since the call, tokens written so far]`` per text
message (``stats.first_token_ms`` and ``stats.token_summary`` read them).
"""

from __future__ import annotations

import base64
import time
from dataclasses import asdict


class RequestFailed(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class GrpcTransport:
    name = "grpc"

    def __init__(self, target, config, images) -> None:
        self.target, self.config, self.images = target, config, images
        self.client = None

    async def open(self) -> None:
        # lazy: grpc and the generated stubs, needed only by the gRPC client
        from mofserve.clients import AsyncMofServeClient

        # no client-side retries: a failure is counted, not hidden
        self.client = AsyncMofServeClient(self.target.address, timeout=self.config.timeout_s, retries=False)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def info(self) -> dict:
        from mofserve.clients import MofServeError  # lazy: grpc and the generated stubs, needed only by the gRPC client

        try:
            health = await self.client.health(timeout=10)
            info = await self.client.server_info(timeout=10)
        except MofServeError as error:
            raise RuntimeError(f"{self.target.url}: {error.code.name}: {error.message}") from None
        if health != "SERVING":
            raise RuntimeError(f"{self.target.url}: health is {health}, not SERVING")
        return {"health": health, "version": info.version, "profile": info.provenance.profile,
                "random_weights": info.provenance.random_weights, "notice": info.provenance.notice,
                "model_versions": info.provenance.model_versions, "modes": info.modes,
                "default_mode": info.default_mode, "default_alpha": info.default_alpha, "limits": info.limits}

    def _kwargs(self, index: int, mode: str) -> dict:
        c = self.config
        return dict(image=self.images[index], question=c.question, options=c.options or None, mode=mode,
                    max_new_tokens=c.max_new_tokens)

    async def ask(self, index: int, mode: str) -> dict:
        from mofserve.clients import MofServeError  # lazy: grpc and the generated stubs, needed only by the gRPC client

        if getattr(self.config, "stream", False):
            return await self._ask_stream(index, mode)
        try:
            result = await self.client.ask(**self._kwargs(index, mode))
        except MofServeError as error:
            raise RequestFailed(error.code.name) from None
        return _result(result)

    async def _ask_stream(self, index: int, mode: str) -> dict:
        # lazy: grpc and the generated stubs, needed only by the gRPC client
        from mofserve.clients import AskResult, MofServeError

        started = time.perf_counter()
        deltas: list[list[float]] = []
        final = None
        try:
            async for item in self.client.ask_stream(**self._kwargs(index, mode)):
                ms = (time.perf_counter() - started) * 1e3
                if isinstance(item, AskResult):
                    final = item
                else:
                    deltas.append([ms, int(item.completion_tokens)])
        except MofServeError as error:
            raise RequestFailed(error.code.name) from None
        if final is None:
            raise RequestFailed("stream_without_result")
        out = _result(final)
        if deltas:
            out["deltas"] = deltas
        return out


def _result(result) -> dict:
    usage = getattr(result, "usage", None)
    completion = usage.completion_tokens if usage is not None and usage.total_tokens else None
    return {"timings": asdict(result.timings), "completion_tokens": completion,
            "prompt_tokens": usage.prompt_tokens if completion is not None else None}


class HttpTransport:
    name = "http"

    def __init__(self, target, config, images) -> None:
        self.target, self.config, self.images = target, config, images
        self.session = None
        self._urls: dict[int, str] = {}

    async def open(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            base_url=f"http://{self.target.address}", timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            connector=aiohttp.TCPConnector(limit=0))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def info(self) -> dict:
        import aiohttp

        try:
            async with self.session.get("/healthz") as response:
                health = await response.json()
            async with self.session.get("/v1/models") as response:
                models = await response.json()
        except (TimeoutError, aiohttp.ClientError) as error:
            raise RuntimeError(f"{self.target.url}: {type(error).__name__}: {error}") from None
        if health.get("status") != "ok":
            raise RuntimeError(f"{self.target.url}: /healthz says {health}")
        return {"health": health.get("status"), "profile": health.get("profile"),
                "models": [m.get("id") for m in models.get("data", [])], **{
                    k: v for k, v in health.items() if k not in ("status", "profile")}}

    def data_url(self, index: int) -> str:
        url = self._urls.get(index)
        if url is None:
            url = self._urls[index] = "data:image/jpeg;base64," + base64.b64encode(self.images[index]).decode()
        return url

    def body(self, index: int, mode: str) -> dict:
        c = self.config
        body = {"model": f"mofserve-{mode}", "max_tokens": c.max_new_tokens,
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": c.question},
                    {"type": "image_url", "image_url": {"url": self.data_url(index)}}]}]}
        if c.options:
            body["options"] = c.options
        return body

    async def ask(self, index: int, mode: str) -> dict:
        import aiohttp

        try:
            async with self.session.post("/v1/chat/completions", json=self.body(index, mode)) as response:
                payload = await response.json(content_type=None)
                if response.status != 200:
                    code = (payload.get("error") or {}).get("code") if isinstance(payload, dict) else None
                    raise RequestFailed(f"{response.status} {code or 'error'}")
        except TimeoutError:
            raise RequestFailed("client_timeout") from None
        except aiohttp.ClientError as error:
            raise RequestFailed(f"connection_error {type(error).__name__}") from None
        except ValueError:
            raise RequestFailed("bad_response") from None
        usage = payload.get("usage") or {}
        counted = bool(usage.get("total_tokens"))  # servers before the streaming engine sent zeros
        return {"timings": dict(payload.get("mofserve", {}).get("timings", {})),
                "completion_tokens": int(usage["completion_tokens"]) if counted else None,
                "prompt_tokens": usage.get("prompt_tokens") if counted else None}


def make_transport(target, config, images):
    return (GrpcTransport if target.scheme == "grpc" else HttpTransport)(target, config, images)
