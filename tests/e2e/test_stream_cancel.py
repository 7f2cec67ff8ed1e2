"""A client that goes away mid-stream frees its sequence's slot in the ``llm`` model, on both
transports, without ever cancelling a Triton call (Triton 2.51 crashes on that, server#7368).

A Triton of its own serves the tiny profile with the language model limited to one sequence at a
time (``llm_max_sequences=1``): a 512-token answer holds the only slot for over a second, so a
second question can only start early if the first one's sequence was cancelled. Triton's own
counters (``mofserve_llm_finished_total{reason="cancelled"}``, ``mofserve_llm_tokens_total``) say
that it was, and how far it got.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
import urllib.request
from types import SimpleNamespace

import aiohttp
import grpc
import pytest

from mofserve.clients import MofServeClient, MofServeError, TokenDelta
from mofserve.server.admission import Admission
from mofserve.server.engine import ServingInfo, TritonEngine
from mofserve.server.grpc_service import build_grpc_server
from mofserve.server.http_api import build_http_app, start_http

from .images import drawing

pytestmark = pytest.mark.integration

QUESTION = "Which side is the red disc on?"
IMAGE = drawing()
LONG = 512  # ~1.3 s of decoding on the tiny LM (its random weights never emit EOS)


@pytest.fixture(scope="module")
def one_sequence(tiny_profile, loop_thread, metrics):
    """Triton with ``llm_max_sequences=1``, an engine and both front-ends over it."""
    from mofserve.export.pipeline import export_profile
    from mofserve.server.launcher import TritonServer

    serving = dataclasses.replace(tiny_profile.serving, llm_max_sequences=1)
    repository = export_profile(dataclasses.replace(tiny_profile, serving=serving), target="cpu")
    triton = TritonServer(repository.path)
    triton.start(timeout=180)
    engine = TritonEngine(triton.grpc_url, ServingInfo(tiny_profile.name, tiny_profile.random_weights),
                          max_batch_size=serving.max_batch_size)

    async def start():
        admission = Admission(metrics=metrics)
        server, port, _ = build_grpc_server(engine, metrics, port=0, admission=admission)
        await server.start()
        runner, http_port = await start_http(build_http_app(engine, metrics, admission=admission), port=0)
        return server, runner, port, http_port

    server, runner, port, http_port = loop_thread.run(start())
    try:
        yield SimpleNamespace(triton=triton, engine=engine, grpc=f"127.0.0.1:{port}",
                              http=f"http://127.0.0.1:{http_port}")
    finally:
        async def stop():
            await server.stop(None)
            await runner.cleanup()
            await engine.close()

        loop_thread.run(stop())
        triton.stop()


def llm_counters(triton) -> tuple[float, float]:
    """(sequences cancelled, tokens generated) as the ``llm`` model counts them."""
    text = urllib.request.urlopen(triton.metrics_url, timeout=5).read().decode()

    def value(prefix: str, *labels: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(prefix + "{") and all(label in line for label in labels))

    return (value("mofserve_llm_finished_total", 'reason="cancelled"'),
            value("mofserve_llm_tokens_total", 'kind="generated"'))


def wait_for_cancel(one_sequence, before: tuple[float, float], timeout: float = 30) -> tuple[float, float]:
    """The counters once one more sequence has been cancelled and the engine has nothing in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = llm_counters(one_sequence.triton)
        if now[0] >= before[0] + 1 and not one_sequence.engine.in_flight:
            return now
        time.sleep(0.05)
    raise AssertionError(f"no cancelled sequence (counters {before} -> {llm_counters(one_sequence.triton)}, "
                         f"{one_sequence.engine.in_flight} Triton streams in flight)")


def test_a_grpc_client_that_vanishes_mid_stream_frees_the_only_slot(one_sequence):
    before = llm_counters(one_sequence.triton)
    with MofServeClient(one_sequence.grpc, timeout=60) as client:
        stream = client.ask_stream(IMAGE, QUESTION, max_new_tokens=LONG)
        first = [next(stream), next(stream)]  # the sequence holds the slot, generating
        stream.close()  # the client goes away: its call is cancelled
        started = time.monotonic()
        second = client.ask(IMAGE, QUESTION, max_new_tokens=2)  # needs the only slot
        waited = time.monotonic() - started
    assert all(isinstance(item, TokenDelta) for item in first)
    assert second.usage.completion_tokens == 2 and second.finish_reason == "length"
    cancelled, generated = wait_for_cancel(one_sequence, before)
    assert cancelled == before[0] + 1
    # the vanished stream stopped far short of its 512 tokens (the second question wrote 2)
    assert generated - before[1] - 2 < LONG / 2, (generated - before[1], waited)
    assert one_sequence.triton.is_alive()


def test_an_http_client_that_disconnects_mid_stream_frees_the_only_slot(one_sequence):
    url = f"{one_sequence.http}/v1/chat/completions"
    image_url = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    body = {"model": "mofserve-clip", "stream": True, "max_tokens": LONG,
            "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                      {"type": "image_url", "image_url": {"url": image_url}}]}]}

    async def go():
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            response = await session.post(url, json=body)
            assert response.status == 200
            contents = 0
            async for line in response.content:  # read until the answer is being generated
                if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    contents += 1
                    if contents == 2:
                        break
            response.close()  # drop the connection mid-stream
            short = {**body, "stream": False, "max_tokens": 2}
            async with session.post(url, json=short) as second:
                return second.status, await second.json()

    before = llm_counters(one_sequence.triton)
    status, second = asyncio.run(go())
    assert status == 200 and second["usage"]["completion_tokens"] == 2
    cancelled, generated = wait_for_cancel(one_sequence, before)
    assert cancelled == before[0] + 1 and generated - before[1] - 2 < LONG / 2
    assert one_sequence.triton.is_alive()


def test_abandoned_streams_never_take_triton_down(one_sequence):
    """Deadlines expiring at every point of a stream (before Triton, in the encoders, mid-decode)
    cancel sequences through the side channel; Triton stays up and the slot is free after."""
    with MofServeClient(one_sequence.grpc, retries=False) as client:
        for timeout in [0.001, 0.01, 0.03, 0.1, 0.3] * 2:
            try:
                for _ in client.ask_stream(IMAGE, QUESTION, max_new_tokens=LONG, timeout=timeout):
                    pass
            except MofServeError as error:
                assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error
        deadline = time.monotonic() + 30
        while one_sequence.engine.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not one_sequence.engine.in_flight
        answer = client.ask(IMAGE, QUESTION, max_new_tokens=2, timeout=30)
    assert answer.usage.completion_tokens == 2 and one_sequence.triton.is_alive()
