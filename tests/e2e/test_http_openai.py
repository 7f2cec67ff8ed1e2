"""The OpenAI-compatible HTTP front-end on the real Triton (tiny profile), driven by the official
``openai`` client and by hand-made requests for everything the client would not send.

The app runs on ``loop_thread`` (as in ``mofserve serve``); requests come from this thread.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from mofserve.core.tensors import FusionMode
from mofserve.server.http_api import build_http_app, start_http
from mofserve.server.openai_protocol import MODEL_IDS, data_url

from .images import drawing

pytestmark = pytest.mark.integration

MAX_BODY = 1 << 20
OPTIONS = "(a) Left (b) Right"


IMAGE_URL = data_url(drawing())


def user_message(text: str = "Which side is the red disc on?", url: str = IMAGE_URL) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def port(loop_thread, engine, metrics):
    app = build_http_app(engine, metrics, max_body_bytes=MAX_BODY)
    runner, bound = loop_thread.run(start_http(app, port=0))
    yield bound
    loop_thread.run(runner.cleanup())


@pytest.fixture(scope="module")
def client(port):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                       timeout=60) as c:
        yield c


def request(port: int, path: str, body: bytes | dict | None = None, content_type: str = "application/json",
            method: str | None = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def error_of(status: int, raw: bytes, expected: int) -> dict:
    assert status == expected, raw[:500]
    payload = json.loads(raw)["error"]
    assert set(payload) == {"message", "type", "param", "code"}
    return payload


def chat_body(**overrides) -> dict:
    return {"model": "mofserve-clip", "messages": user_message(), "max_tokens": 4, **overrides}


# ---- the official client ------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(FusionMode))
def test_chat_completion_in_every_mode(client, mode):
    extra = {"options": OPTIONS, "alpha": 0.5} if mode is FusionMode.ADDITIVE else {"options": OPTIONS}
    completion = client.chat.completions.create(
        model=f"mofserve-{mode.value}", messages=user_message(), max_tokens=6, seed=1, extra_body=extra)
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == f"mofserve-{mode.value}"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"  # the tiny LM's random weights never emit EOS
    usage = completion.usage
    assert usage.completion_tokens == 6 and usage.prompt_tokens > 256  # visual + text tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    ext = completion.model_extra["mofserve"]
    assert ext["mode"] == mode.value and ext["random_weights"] is True and "not meaningful" in ext["notice"]
    assert ext["chosen_option"] in ("a", "b") and len(ext["option_scores"]) == 2
    assert ext["timings"]["total_ms"] > 0
    if mode is FusionMode.ADDITIVE:
        assert ext["alpha"] == 0.5
    else:
        assert ext["alpha"] is None


def test_additive_default_alpha_and_system_message(client, tiny_profile):
    messages = [{"role": "system", "content": "You are a careful assistant."}, *user_message()]
    completion = client.chat.completions.create(model="additive", messages=messages, max_completion_tokens=4)
    ext = completion.model_extra["mofserve"]
    assert completion.model == "mofserve-additive" and ext["alpha"] == tiny_profile.default_alpha
    assert ext["chosen_option"] == "" and ext["option_scores"] == []
    assert any("system message ignored" in w for w in ext["warnings"])


def test_streaming_with_the_client_token_by_token_with_usage(client):
    stream = client.chat.completions.create(model="mofserve-interleaved", messages=user_message(), max_tokens=8,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"options": OPTIONS})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(contents) >= 2  # the answer arrives in pieces, as it is generated
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].model_extra["mofserve"]["chosen_option"] in ("a", "b")
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    whole = client.chat.completions.create(model="mofserve-interleaved", messages=user_message(), max_tokens=8,
                                           extra_body={"options": OPTIONS})
    assert "".join(contents) == whole.choices[0].message.content  # greedy: the same answer
    assert chunks[-1].usage == whole.usage  # non-stream usage equals the stream's


def sse_frames(port: int, body: dict, headers: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """POSTs ``body`` and splits the response into its Server-Sent Events, as they arrived."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        raw = response.read().decode()
        return response.status, ([f for f in raw.split("\n\n") if f] if response.status == 200 else [raw])
    finally:
        connection.close()


def test_sse_wire_format_without_usage(port):
    status, frames = sse_frames(port, chat_body(stream=True, max_tokens=5))
    assert status == 200 and frames[-1] == "data: [DONE]"
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["mofserve"]["mode"] == "clip"
    assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) >= 2


def test_stream_errors_before_the_first_chunk_keep_their_status(port):
    bad = chat_body(stream=True, messages=user_message(url=data_url(b"this is not an image")))
    status, frames = sse_frames(port, bad)
    payload = error_of(status, frames[0].encode(), 400)
    assert payload["message"].startswith("image:") and payload["param"] == "messages[0].content[1].image_url.url"


def stream_times(port: int, body: dict) -> tuple[float, float]:
    """Seconds to the first SSE data frame and to the end of the stream, for ``body``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        started = time.monotonic()
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        first = None
        while line := response.readline():
            if first is None and line.startswith(b"data: "):
                first = time.monotonic() - started
        return first or 0.0, time.monotonic() - started
    finally:
        connection.close()


def test_an_error_after_the_stream_began_is_an_error_event(port):
    # a deadline half-way between this machine's first chunk and the end of a 512-token answer
    # (a fixed 1 s was flaky: on a quiet machine the tiny LM writes 512 tokens in under a second)
    body = chat_body(stream=True, max_tokens=512)
    first, total = stream_times(port, body)
    status, frames = sse_frames(port, body, {"X-Request-Timeout": f"{(first + total) / 2:.3f}"})
    assert status == 200 and frames[0].startswith("data: ")
    assert "data: [DONE]" not in frames
    event, data = frames[-1].split("\n")
    assert event == "event: error"
    error = json.loads(data.removeprefix("data: "))["error"]
    assert error["code"] == "deadline_exceeded" and error["message"].startswith("deadline:")


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == list(MODEL_IDS)
    assert client.models.retrieve("mofserve-dinov2").id == "mofserve-dinov2"


def test_client_sees_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=user_message())
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="mofserve-additive", messages=user_message(), extra_body={"alpha": 2})
    assert info.value.body["param"] == "alpha"


# ---- hand-made requests -------------------------------------------------------------------

def test_bad_data_url(port):
    bad = chat_body(messages=user_message(url="data:image/png;base64,%%%not-base64%%%"))
    payload = error_of(*request(port, "/v1/chat/completions", bad)[::2], 400)
    assert payload["param"] == "messages[0].content[1].image_url.url" and "base64" in payload["message"]


def test_undecodable_image_is_refused_by_the_pipeline(port):
    bad = chat_body(messages=user_message(url=data_url(b"this is not an image")))
    payload = error_of(*request(port, "/v1/chat/completions", bad)[::2], 400)
    assert payload["param"] == "messages[0].content[1].image_url.url"
    assert payload["message"].startswith("image:")


def test_http_url_refused(port):
    bad = chat_body(messages=user_message(url="https://example.com/dog.png"))
    payload = error_of(*request(port, "/v1/chat/completions", bad)[::2], 400)
    assert payload["param"] == "messages[0].content[1].image_url.url" and "never reaches" in payload["message"]


def test_unknown_model_404(port):
    payload = error_of(*request(port, "/v1/chat/completions", chat_body(model="llava"))[::2], 404)
    assert payload["param"] == "model" and payload["code"] == "model_not_found"
    error_of(*request(port, "/v1/models/llava")[::2], 404)


def test_alpha_outside_range(port):
    payload = error_of(*request(port, "/v1/chat/completions", chat_body(model="mofserve-additive", alpha=1.5))[::2],
                       400)
    assert payload["param"] == "alpha" and "[0, 1]" in payload["message"]


def test_wrong_content_type_415(port):
    raw = json.dumps(chat_body()).encode()
    payload = error_of(*request(port, "/v1/chat/completions", raw, "text/plain")[::2], 415)
    assert "application/json" in payload["message"]
    error_of(*request(port, "/v1/chat/completions", b"a=1", "application/x-www-form-urlencoded")[::2], 415)


def test_oversize_body_413(port):
    big = chat_body(messages=user_message(url=data_url(b"x" * MAX_BODY)))
    payload = error_of(*request(port, "/v1/chat/completions", big)[::2], 413)
    assert str(MAX_BODY) in payload["message"]
    # without a Content-Length (chunked), aiohttp's client_max_size stops the read
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    raw = json.dumps(big).encode()
    connection.request("POST", "/v1/chat/completions", body=iter([raw[i:i + 65536] for i in range(0, len(raw), 65536)]),
                       headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    error_of(response.status, response.read(), 413)
    connection.close()


def test_invalid_json_400(port):
    payload = error_of(*request(port, "/v1/chat/completions", b'{"model": "mofserve-clip", ')[::2], 400)
    assert payload["code"] == "invalid_json"
    error_of(*request(port, "/v1/chat/completions", b"[1, 2]")[::2], 400)


def test_unknown_field_and_route(port):
    payload = error_of(*request(port, "/v1/chat/completions", chat_body(aplha=0.5))[::2], 400)
    assert payload["param"] == "aplha"
    error_of(*request(port, "/v1/completions", chat_body())[::2], 404)
    error_of(*request(port, "/v1/chat/completions", method="GET")[::2], 405)


def test_healthz(port):
    status, _, raw = request(port, "/healthz")
    assert status == 200
    payload = json.loads(raw)
    assert payload["status"] == "ok" and payload["triton"] is True


def test_still_serving_after_bad_requests(client):
    completion = client.chat.completions.create(model="mofserve-dinov2", messages=user_message(), max_tokens=2)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 2


def test_metrics_after_traffic(port):
    status, headers, raw = request(port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = raw.decode()
    assert "mofserve_requests_total" in text
    lines = [line for line in text.splitlines() if line.startswith("mofserve_requests_total{")]
    assert any('transport="http"' in line and 'method="chat.completions"' in line and 'mode="clip"' in line
               and 'status="ok"' in line for line in lines)
    assert any('transport="http"' in line and 'status="not_found"' in line for line in lines)
    assert any('transport="http"' in line and 'status="invalid_argument"' in line for line in lines)
    assert 'mofserve_stage_seconds_count{mode="clip",stage="llm"}' in text
