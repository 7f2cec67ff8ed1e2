"""Limits and backpressure on the real front-ends over the tiny Triton: a flood beyond
``max_in_flight + max_queue`` is refused fast with RESOURCE_EXHAUSTED / 429 and retry advice while
the admitted requests are answered; deadlines (the caller's, clamped, or the default) end a
request with DEADLINE_EXCEEDED / 504 and the server goes on; request size limits on both transports.

Both front-ends share one ``Admission`` here, as in ``mofserve serve``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Iterator
from types import SimpleNamespace

import aiohttp
import grpc
import pytest

from mofserve.clients import MofServeClient, MofServeError
from mofserve.server.admission import Admission, AdmissionLimits
from mofserve.server.grpc_service import build_grpc_server
from mofserve.server.http_api import build_http_app, start_http
from mofserve.v1 import mofserve_pb2 as pb
from mofserve.v1 import mofserve_pb2_grpc as pb_grpc

from .images import drawing

pytestmark = pytest.mark.integration

QUESTION = "Which side is the red disc on?"
OPTIONS = "(a) Left (b) Right"
#: 256 greedy tokens of the tiny LLM take 250+ ms (its random weights never emit EOS): slow enough
#: that a burst arrives while the first requests still run
SLOW_TOKENS = 256
MAX_IN_FLIGHT, MAX_QUEUE = 1, 2
BURST = 10
SIZE_LIMIT = 64 << 10


IMAGE = drawing()


def chat_body(tokens: int = 2, image: bytes = IMAGE) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {"model": "mofserve-clip", "max_tokens": tokens, "options": OPTIONS,
            "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}


def _servers(loop_thread, engine, metrics, limits: AdmissionLimits, **sizes) -> SimpleNamespace:
    async def start():
        admission = Admission(limits, metrics)
        server, port, _ = build_grpc_server(engine, metrics, port=0, admission=admission,
                                            max_message_bytes=sizes.get("max_message_bytes"))
        await server.start()
        app = build_http_app(engine, metrics, admission=admission, max_body_bytes=sizes.get("max_body_bytes"))
        runner, http_port = await start_http(app, port=0)
        return SimpleNamespace(grpc=f"127.0.0.1:{port}", http=f"http://127.0.0.1:{http_port}", admission=admission,
                               server=server, runner=runner)

    return loop_thread.run(start())


def stop_front_ends(loop_thread, servers: SimpleNamespace) -> None:
    """Stops the gRPC server and HTTP runner that a fixture of these tests started."""
    async def stop():
        await servers.server.stop(None)
        await servers.runner.cleanup()

    loop_thread.run(stop())


@pytest.fixture(scope="module")
def busy(loop_thread, engine, metrics):
    """Front-ends with one slot and a queue of two, sharing one admission."""
    servers = _servers(loop_thread, engine, metrics, AdmissionLimits(max_in_flight=MAX_IN_FLIGHT, max_queue=MAX_QUEUE))
    yield servers
    stop_front_ends(loop_thread, servers)


@pytest.fixture(scope="module")
def strict(loop_thread, engine, metrics):
    """Front-ends with a 5 ms deadline cap and 64 KiB request limits."""
    servers = _servers(loop_thread, engine, metrics, AdmissionLimits(default_deadline_s=0.005, max_deadline_s=0.005),
                       max_message_bytes=SIZE_LIMIT, max_body_bytes=SIZE_LIMIT)
    yield servers
    stop_front_ends(loop_thread, servers)


def _ask(tokens: int) -> pb.AskRequest:
    return pb.AskRequest(image=IMAGE, question=QUESTION, options=OPTIONS, mode="clip",
                         generation=pb.GenerationParams(max_new_tokens=tokens))


def _wait_idle(admission: Admission, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (admission.executing or admission.queued) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (admission.executing, admission.queued) == (0, 0), "slots leaked"


# ---- flood -------------------------------------------------------------------------------------


def test_grpc_flood_beyond_the_queue_is_refused_fast_with_retry_advice_then_service_goes_on(busy, metrics):
    rejected_before = metrics.admission_rejected.labels("grpc", "queue_full")._value.get()
    with grpc.insecure_channel(busy.grpc) as channel:
        stub = pb_grpc.MofServeStub(channel)
        started = time.monotonic()
        calls = [stub.Ask.future(_ask(SLOW_TOKENS), timeout=60) for _ in range(BURST)]
        done_at: dict[int, float] = {}
        for i, call in enumerate(calls):
            call.add_done_callback(lambda _, i=i: done_at.setdefault(i, time.monotonic() - started))
        outcomes = []
        for call in calls:
            try:
                call.result()
                outcomes.append(("ok", None))
            except grpc.RpcError as error:
                outcomes.append((error.code(), dict(error.trailing_metadata() or ())))
        refused = [i for i, (code, _) in enumerate(outcomes) if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        answered = [i for i, (code, _) in enumerate(outcomes) if code == "ok"]
        # everything is either answered or refused; at most max_in_flight + max_queue get in while
        # the first requests run (more only if one finished before the burst was in)
        assert len(refused) + len(answered) == BURST, outcomes
        assert len(refused) >= BURST - (MAX_IN_FLIGHT + MAX_QUEUE) - 2, outcomes
        # refused at once, not after queueing: faster than any answered request
        assert max(done_at[i] for i in refused) < min(done_at[i] for i in answered)
        for i in refused:
            trailers = outcomes[i][1]
            assert int(trailers["retry-after-ms"]) >= 1
            assert trailers["grpc-retry-pushback-ms"] == trailers["retry-after-ms"]
        details = calls[refused[0]].exception().details()
        assert "max_in_flight=1" in details and "max_queue=2" in details and "retry after" in details
        _wait_idle(busy.admission)
        answer = stub.Ask(_ask(2), timeout=60)
        assert answer.chosen_option in {"a", "b"}
    assert metrics.admission_rejected.labels("grpc", "queue_full")._value.get() - rejected_before == len(refused)


def test_http_flood_beyond_the_queue_gets_429_with_retry_after_then_service_goes_on(busy):
    async def flood():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            async def post(tokens: int):
                async with session.post(f"{busy.http}/v1/chat/completions", json=chat_body(tokens)) as response:
                    return response.status, dict(response.headers), await response.json()

            results = await asyncio.gather(*(post(SLOW_TOKENS) for _ in range(BURST)))
            while busy.admission.executing or busy.admission.queued:
                await asyncio.sleep(0.05)
            after = await post(2)
            return results, after

    results, after = asyncio.run(flood())
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= BURST - (MAX_IN_FLIGHT + MAX_QUEUE) - 2, statuses
    for status, headers, body in results:
        if status == 429:
            assert int(headers["Retry-After"]) >= 1
            error = body["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "resource_exhausted"
            assert "max_in_flight=1" in error["message"] and "max_queue=2" in error["message"]
    assert after[0] == 200 and after[2]["mofserve"]["chosen_option"] in {"a", "b"}


def test_both_transports_share_one_queue(busy, loop_thread):
    """While HTTP holds the slot and fills the queue, gRPC is refused, and the reverse holds too."""
    with _admission_full(busy, loop_thread, "http"):
        with MofServeClient(busy.grpc, retries=False) as client, pytest.raises(MofServeError) as caught:
            client.ask(IMAGE, QUESTION, options=OPTIONS, mode="clip", max_new_tokens=2, timeout=30)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.retry_after_s is not None and caught.value.retry_after_s > 0
    _wait_idle(busy.admission)


@contextlib.contextmanager
def _admission_full(busy, loop_thread, transport: str) -> Iterator[None]:
    """Every slot and queue place of ``busy.admission`` taken (by holders on ``transport``) until exit."""
    async def hold(release: asyncio.Event):
        async with busy.admission.admit(None, transport):
            await release.wait()

    release = loop_thread.run(_make_event())
    holders = [asyncio.run_coroutine_threadsafe(hold(release), loop_thread.loop)
               for _ in range(MAX_IN_FLIGHT + MAX_QUEUE)]
    try:
        deadline = time.monotonic() + 10
        while busy.admission.queued < MAX_QUEUE and time.monotonic() < deadline:
            time.sleep(0.01)
        yield
    finally:
        loop_thread.loop.call_soon_threadsafe(release.set)
        for holder in holders:
            holder.result(10)


async def _make_event() -> asyncio.Event:
    return asyncio.Event()


def test_callers_that_give_up_free_their_slots(busy):
    """A client deadline that expires mid-request (the server's handler is cancelled or answers
    DEADLINE_EXCEEDED itself) gives the slot back: one slot, yet every later request gets in."""
    with MofServeClient(busy.grpc, retries=False) as client:
        for _ in range(4):
            with pytest.raises(MofServeError) as caught:
                client.ask(IMAGE, QUESTION, options=OPTIONS, mode="clip", max_new_tokens=SLOW_TOKENS, timeout=0.05)
            assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_idle(busy.admission)
        assert client.ask(IMAGE, QUESTION, options=OPTIONS, mode="clip", max_new_tokens=2,
                          timeout=60).chosen_option in {"a", "b"}


def test_a_stream_holds_its_slot_until_it_ends_and_a_vanished_client_frees_it(busy):
    """AskStream and an SSE chat completion are admitted like Ask: the slot is theirs until the last
    message; a streaming client that goes away gives it back."""
    with MofServeClient(busy.grpc, retries=False) as client:
        stream = client.ask_stream(IMAGE, QUESTION, mode="clip", max_new_tokens=SLOW_TOKENS, timeout=60)
        next(stream)
        assert busy.admission.executing == MAX_IN_FLIGHT  # mid-stream: the one slot is held
        with MofServeClient(busy.grpc, retries=False) as other, pytest.raises(MofServeError) as caught:
            other.ask(IMAGE, QUESTION, mode="clip", max_new_tokens=2, timeout=0.2)  # queued behind it
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        items = list(stream)
        assert items[-1].usage.completion_tokens == SLOW_TOKENS
        _wait_idle(busy.admission)
        stream = client.ask_stream(IMAGE, QUESTION, mode="clip", max_new_tokens=SLOW_TOKENS, timeout=60)
        next(stream)
        stream.close()  # the client goes away mid-stream
        _wait_idle(busy.admission)
    status, _, body = _post(busy.http, json.dumps({**chat_body(), "stream": False}).encode())
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_health_and_server_info_bypass_admission(busy, loop_thread):
    import urllib.request

    with _admission_full(busy, loop_thread, "grpc"):
        with MofServeClient(busy.grpc, retries=False) as client:
            assert client.health() == "SERVING"
            assert client.server_info(timeout=10).version
        with urllib.request.urlopen(f"{busy.http}/v1/models", timeout=10) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"{busy.http}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert f"mofserve_admission_queue_depth {float(MAX_QUEUE)}" in text
        assert f"mofserve_admission_executing {float(MAX_IN_FLIGHT)}" in text
    _wait_idle(busy.admission)


# ---- deadlines ---------------------------------------------------------------------------------


def test_grpc_deadline_is_clamped_by_the_server_and_expires_with_deadline_exceeded(strict, busy):
    with MofServeClient(strict.grpc, retries=False) as client:
        started = time.monotonic()
        with pytest.raises(MofServeError) as caught:  # asks for 30 s; the server allows 5 ms
            client.ask(IMAGE, QUESTION, options=OPTIONS, mode="clip", max_new_tokens=SLOW_TOKENS, timeout=30)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert caught.value.message.startswith("deadline:")  # the server's, not the client's
        assert time.monotonic() - started < 5
    _wait_idle(strict.admission)
    with MofServeClient(busy.grpc) as client:  # the engine and Triton go on serving
        assert client.ask(IMAGE, QUESTION, options=OPTIONS, mode="clip", max_new_tokens=2,
                          timeout=60).chosen_option in {"a", "b"}


def test_grpc_default_deadline_applies_when_the_client_sends_none(strict):
    with MofServeClient(strict.grpc, retries=False) as client, pytest.raises(MofServeError) as caught:
        client.ask(IMAGE, QUESTION, options=OPTIONS, mode="clip", max_new_tokens=SLOW_TOKENS, timeout=None)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.message.startswith("deadline:")


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read() or b"{}")


def test_http_request_timeout_header_too_short_gives_504_and_the_server_goes_on(busy):
    status, _, body = _post(busy.http, json.dumps(chat_body(SLOW_TOKENS)).encode(), {"X-Request-Timeout": "0.005"})
    assert status == 504 and body["error"]["code"] == "deadline_exceeded"
    assert body["error"]["message"].startswith("deadline:")
    _wait_idle(busy.admission)
    status, _, body = _post(busy.http, json.dumps(chat_body()).encode())
    assert status == 200 and body["mofserve"]["chosen_option"] in {"a", "b"}


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf"])
def test_http_bad_request_timeout_header_is_refused_naming_it(busy, value):
    status, _, body = _post(busy.http, json.dumps(chat_body()).encode(), {"X-Request-Timeout": value})
    assert status == 400 and body["error"]["message"].startswith("x-request-timeout:")


def test_http_default_deadline_applies_to_every_request(strict):
    status, _, body = _post(strict.http, json.dumps(chat_body(SLOW_TOKENS)).encode())
    assert status == 504 and body["error"]["message"].startswith("deadline:")


# ---- request size ------------------------------------------------------------------------------


def test_grpc_message_over_max_message_bytes_is_resource_exhausted(strict):
    with MofServeClient(strict.grpc, retries=False) as client, pytest.raises(MofServeError) as caught:
        client.ask(b"\x89PNG" + bytes(SIZE_LIMIT), QUESTION, timeout=30)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(SIZE_LIMIT) in caught.value.message  # grpc's own message: "... (N vs. 65536)"
    with MofServeClient(strict.grpc) as client:
        assert client.health() == "SERVING"


def test_http_body_over_max_body_bytes_is_413_naming_the_limit(strict):
    body = json.dumps(chat_body(image=b"\x89PNG" + bytes(SIZE_LIMIT))).encode()
    status, _, answer = _post(strict.http, body)
    assert status == 413 and answer["error"]["code"] == "too_large"
    assert f"{SIZE_LIMIT} bytes (max_body_bytes)" in answer["error"]["message"]
