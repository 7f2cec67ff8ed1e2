"""e2e fixtures: an asyncio loop in a background thread and a TritonEngine on the session's Triton.

Front-end servers (gRPC, HTTP) run on ``loop_thread``'s loop, as in ``mofserve serve``; tests
talk to them from the main thread with ordinary (sync) clients over loopback.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from mofserve.server.engine import ServingInfo, TritonEngine
from mofserve.server.metrics import FrontendMetrics

R = TypeVar("R")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="e2e-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, R], timeout: float = 120) -> R:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def engine(tiny_triton, tiny_profile, loop_thread) -> Iterator[TritonEngine]:
    info = ServingInfo(profile=tiny_profile.name, random_weights=tiny_profile.random_weights)
    eng = TritonEngine(tiny_triton.grpc_url, info, max_batch_size=tiny_profile.serving.max_batch_size)
    yield eng
    loop_thread.run(eng.close())


@pytest.fixture(scope="session")
def metrics() -> FrontendMetrics:
    return FrontendMetrics()


@pytest.fixture(scope="module")
def served(loop_thread, engine, metrics) -> Iterator[SimpleNamespace]:
    """The gRPC front-end on a free loopback port, on ``loop_thread``'s loop (one per test module)."""
    from mofserve.server.grpc_service import build_grpc_server

    async def start():
        server, port, health = build_grpc_server(engine, metrics, port=0)
        await server.start()
        return server, port, health

    server, port, health = loop_thread.run(start())
    yield SimpleNamespace(target=f"127.0.0.1:{port}", port=port, health=health)
    loop_thread.run(server.stop(None))
