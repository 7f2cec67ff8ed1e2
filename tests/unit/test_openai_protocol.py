"""The OpenAI wire format of the HTTP front-end: parsing and responses, no server."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from mofserve.core.tensors import FusionMode
from mofserve.server import openai_protocol as P
from mofserve.server.engine import ERROR_CODES, Answer, EngineError, Limits, ServingInfo, StageTimings, Usage

LIMITS = Limits()


def png(width: int = 8, height: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png()
URL = P.data_url(PNG)


def body(**overrides) -> dict:
    content = [{"type": "text", "text": "Is the dog facing left or right?"},
               {"type": "image_url", "image_url": {"url": URL}}]
    request = {"model": "mofserve-clip", "messages": [{"role": "user", "content": content}]}
    request.update(overrides)
    return request


def refused(request, status: int = 400, limits: Limits = LIMITS) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as info:
        P.parse_chat_request(request, limits)
    assert info.value.status == status, info.value.message
    assert P.HTTP_STATUS[info.value.reason] == status  # the engine code it is counted as, made with it
    return info.value


# ---- models ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(FusionMode))
def test_model_names_map_to_modes(mode):
    assert P.resolve_model(f"mofserve-{mode.value}") is mode
    assert P.resolve_model(mode.value) is mode
    assert P.model_id(mode) == f"mofserve-{mode.value}"


@pytest.mark.parametrize("name", ["gpt-4o", "mofserve-", "mofserve-CLIP", "clip2", ""])
def test_unknown_model_is_404_naming_model(name):
    error = refused(body(model=name), 404)
    assert error.param == "model" and error.code == "model_not_found"
    assert "mofserve-interleaved" in error.message


def test_missing_or_non_string_model_is_400():
    request = body()
    del request["model"]
    assert refused(request).param == "model"
    assert refused(body(model=3)).param == "model"


def test_model_list_has_one_entry_per_mode():
    info = ServingInfo("tiny", True)
    listing = P.model_list(info, created=123)
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == list(P.MODEL_IDS)
    assert all(m["object"] == "model" and m["created"] == 123 and m["owned_by"] == "mofserve"
               for m in listing["data"])


# ---- data URLs ------------------------------------------------------------------------------

def test_data_url_round_trip():
    assert P.decode_data_url(URL, "u", 1 << 20) == PNG
    assert P.decode_data_url("data:image/jpeg;base64," + base64.b64encode(b"abc").decode(), "u", 10) == b"abc"


def test_data_url_tolerates_whitespace_and_media_parameters():
    encoded = base64.b64encode(PNG).decode()
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    assert P.decode_data_url(f"data:image/png;name=x.png;base64,{wrapped}", "u", 1 << 20) == PNG


@pytest.mark.parametrize("url, fragment", [
    ("https://example.com/dog.png", "not fetched"),
    ("HTTP://example.com/dog.png", "not fetched"),
    ("file:///etc/passwd", "expected a data URL"),
    ("data:image/png,rawbytes", "base64"),
    ("data:text/plain;base64,aGVsbG8=", "image/*"),
    ("data:image/png;base64,", "no image data"),
    ("data:image/png;base64,@@@@", "invalid base64"),
    ("data:image/png;base64,abc", "invalid base64"),
])
def test_bad_data_urls_name_the_param(url, fragment):
    with pytest.raises(P.ProtocolError) as info:
        P.decode_data_url(url, "messages[0].content[1].image_url.url", 1 << 20)
    assert info.value.status == 400
    assert info.value.param == "messages[0].content[1].image_url.url"
    assert fragment in info.value.message


def test_oversize_image_is_413_before_decoding():
    with pytest.raises(P.ProtocolError) as info:
        P.decode_data_url(P.data_url(b"x" * 1001), "p", 1000)
    assert info.value.status == 413 and info.value.code == "too_large" and "1001" in info.value.message
    assert P.decode_data_url(P.data_url(b"x" * 1000), "p", 1000) == b"x" * 1000


def test_http_image_url_refused_in_a_request():
    request = body()
    request["messages"][0]["content"][1]["image_url"]["url"] = "http://example.com/x.png"
    error = refused(request)
    assert error.param == "messages[0].content[1].image_url.url" and "never reaches the network" in error.message


def test_oversize_image_in_a_request_is_413():
    error = refused(body(), 413, Limits(max_image_bytes=len(PNG) - 1))
    assert error.param == "messages[0].content[1].image_url.url"


# ---- messages -------------------------------------------------------------------------------

def test_parses_a_full_request():
    chat = P.parse_chat_request(body(model="additive", alpha=0.25, options="(a) Left (b) Right", max_tokens=8,
                                     temperature=0.5, top_p=0.9, seed=7, n=1, stream=False, user="u1"), LIMITS)
    assert chat.model == "mofserve-additive"
    assert chat.selection.mode is FusionMode.ADDITIVE and chat.selection.alpha == 0.25
    assert chat.question.image == PNG
    assert chat.question.question == "Is the dog facing left or right?"
    assert chat.question.options == "(a) Left (b) Right"
    g = chat.question.generation
    assert (g.max_new_tokens, g.temperature, g.top_p, g.seed) == (8, 0.5, 0.9, 7)
    assert not chat.stream and chat.warnings == []
    assert chat.params["image"] == "messages[0].content[1].image_url.url"


def test_defaults_leave_generation_to_the_model():
    g = P.parse_chat_request(body(), LIMITS).question.generation
    assert (g.max_new_tokens, g.temperature, g.top_p, g.seed) == (None, None, None, None)


def test_max_completion_tokens_wins_and_is_named():
    chat = P.parse_chat_request(body(max_tokens=3, max_completion_tokens=5), LIMITS)
    assert chat.question.generation.max_new_tokens == 5
    error = refused(body(max_completion_tokens=LIMITS.max_new_tokens + 1))
    assert error.param == "max_completion_tokens" and str(LIMITS.max_new_tokens) in error.message


def test_text_parts_are_joined_and_image_may_come_first():
    content = [{"type": "image_url", "image_url": URL}, {"type": "text", "text": "Is it red?"},
               {"type": "text", "text": "Answer briefly."}]
    chat = P.parse_chat_request(body(messages=[{"role": "user", "content": content}]), LIMITS)
    assert chat.question.question == "Is it red?\nAnswer briefly."
    assert chat.params["image"] == "messages[0].content[0].image_url"


def test_system_message_is_ignored_with_a_warning():
    messages = [{"role": "system", "content": "You are helpful."}, body()["messages"][0]]
    chat = P.parse_chat_request(body(messages=messages), LIMITS)
    assert chat.question.question == "Is the dog facing left or right?"
    assert chat.warnings and "messages[0]" in chat.warnings[0]
    assert chat.params["image"] == "messages[1].content[1].image_url.url"


@pytest.mark.parametrize("role", ["assistant", "tool", "function"])
def test_prior_turns_are_refused(role):
    messages = [body()["messages"][0], {"role": role, "content": "earlier answer"}]
    error = refused(body(messages=messages))
    assert error.param == "messages[1]" and "single user message" in error.message


@pytest.mark.parametrize("messages, param, fragment", [
    ([], "messages", "non-empty"),
    ("hi", "messages", "non-empty"),
    ([{"role": "user", "content": "no image here"}], "messages[0].content", "an image is required"),
    ([{"role": "user", "content": []}], "messages[0].content", "non-empty"),
    ([{"role": "user", "content": [{"type": "text", "text": "q"}]}], "messages[0].content", "exactly one image"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": URL}}]}], "messages[0].content",
     "text part"),
    ([{"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": URL}},
                                   {"type": "image_url", "image_url": {"url": URL}}]}],
     "messages[0].content", "got 2"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "messages[0].content[0].type",
     "unsupported"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     "messages[0].content[0].image_url.url", "required"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": URL, "detail": "max"}}]}],
     "messages[0].content[0].image_url.detail", "auto"),
    ([{"role": "robot", "content": "x"}], "messages[0].role", "unknown role"),
    (["x"], "messages[0]", "object"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": URL}}]}],
     "messages[0].content[0]", "text parts only"),
    ([{"role": "system", "content": "only a system prompt"}], "messages", "user message"),
])
def test_bad_messages_name_the_field(messages, param, fragment):
    error = refused(body(messages=messages))
    assert error.param == param and fragment in error.message, error.message


def test_two_user_messages_are_refused():
    user = body()["messages"][0]
    assert refused(body(messages=[user, user])).param == "messages[1]"


def test_long_question_names_the_limit():
    content = [{"type": "text", "text": "x" * 11}, {"type": "image_url", "image_url": {"url": URL}}]
    error = refused(body(messages=[{"role": "user", "content": content}]), limits=Limits(max_question_chars=10))
    assert error.param == "messages[0].content" and "max_question_chars" in error.message


# ---- parameters -----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, fragment", [
    ("alpha", 1.5, "[0, 1]"),
    ("alpha", -0.1, "[0, 1]"),
    ("alpha", "0.5", "number"),
    ("alpha", True, "number"),
    ("temperature", 2.5, "[0, 2]"),
    ("top_p", 0, "(0, 1]"),
    ("max_tokens", 0, "[1, 512]"),
    ("max_tokens", 1.5, "integer"),
    ("seed", -1, "[0,"),
    ("n", 2, "n=1"),
    ("stream", "yes", "boolean"),
    ("stream_options", {"include_usage": True}, "stream: true"),
    ("options", 3, "string"),
])
def test_bad_parameters_name_the_field(field, value, fragment):
    model = "mofserve-additive" if field == "alpha" else "mofserve-clip"
    error = refused(body(model=model, **{field: value}))
    assert error.param == field and fragment in error.message, error.message


def test_alpha_is_for_additive_only():
    error = refused(body(model="mofserve-interleaved", alpha=0.5))
    assert error.param == "alpha" and "additive" in error.message


def test_nulls_mean_absent():
    chat = P.parse_chat_request(body(max_tokens=None, temperature=None, top_p=None, seed=None, n=None,
                                     stream=None, alpha=None, options=None, stop=None, tools=None), LIMITS)
    assert chat.selection.alpha is None and chat.question.options is None


def test_options_as_a_list_of_strings():
    chat = P.parse_chat_request(body(options=["Left", "Right"]), LIMITS)
    assert json.loads(chat.question.options) == ["Left", "Right"]
    assert refused(body(options=["Left", 2])).param == "options"


def test_stream_options():
    chat = P.parse_chat_request(body(stream=True, stream_options={"include_usage": True}), LIMITS)
    assert chat.stream and chat.include_usage


def test_unknown_field_is_refused_and_standard_ones_ignored():
    error = refused(body(aplha=0.5))
    assert error.param == "aplha" and error.code == "unknown_parameter"
    P.parse_chat_request(body(user="x", metadata={"k": "v"}, store=False, frequency_penalty=0,
                              logprobs=False, response_format={"type": "text"}, tool_choice="none"), LIMITS)


@pytest.mark.parametrize("field, value", [("stop", ["\n"]), ("tools", [{"type": "function"}]), ("logprobs", True),
                                          ("presence_penalty", 0.5), ("response_format", {"type": "json_object"})])
def test_unsupported_standard_fields_refused_unless_default(field, value):
    error = refused(body(**{field: value}))
    assert error.param == field and error.code == "unsupported_parameter"


def test_body_must_be_an_object():
    assert refused([1, 2]).param is None


# ---- engine errors and responses ------------------------------------------------------------

def test_engine_errors_map_status_and_param():
    params = {"image": "messages[0].content[1].image_url.url", "question": "messages[0].content",
              "max_new_tokens": "max_tokens"}
    cases = [
        (EngineError("invalid_argument", "image: cannot decode", "image"), 400, "messages[0].content[1].image_url.url"),
        (EngineError.refused("image", "30 bytes exceeds the limit", "too_large"), 413,
         "messages[0].content[1].image_url.url"),
        (EngineError("invalid_argument", "options: expected '(a) ...'", "options"), 400, "options"),
        (EngineError.refused("max_new_tokens", "must be within"), 400, "max_tokens"),
        (EngineError.refused("images[1]", "empty"), 400, None),  # no such field in a chat completion
        (EngineError("resource_exhausted", "queue full"), 429, None),
        (EngineError("unavailable", "triton: not reachable"), 503, None),
        (EngineError("deadline_exceeded", "deadline: expired"), 504, None),
        (EngineError("not_found", "Request for unknown model: 'vqa_clip' is not found"), 404, "model"),
        (EngineError("internal", "boom"), 500, None),
    ]
    for error, status, param in cases:
        mapped = P.from_engine_error(error, params)
        assert (mapped.status, mapped.param, mapped.reason) == (status, param, error.code), error.message
        shape = P.error_body(mapped)["error"]
        assert set(shape) == {"message", "type", "param", "code"} and shape["message"] == error.message
    assert P.from_engine_error(EngineError("resource_exhausted", "x")).type == "rate_limit_error"
    assert P.from_engine_error(EngineError("unavailable", "x")).type == "server_error"
    assert P.from_engine_error(EngineError("not_found", "x")).code == "model_not_found"


def test_param_is_the_errors_field_never_its_text():
    """A message that looks like "field: ..." names nothing: only ``EngineError.field`` does."""
    assert P.from_engine_error(EngineError("invalid_argument", "alpha: must be within [0, 1]")).param is None
    assert P.from_engine_error(EngineError("invalid_argument", "must be within [0, 1]", "alpha")).param == "alpha"


def test_every_engine_code_has_an_http_status():
    assert set(P.HTTP_STATUS) == ERROR_CODES
    assert P.from_engine_error(EngineError("no_such_code", "x")).status == 500


def answer(mode=FusionMode.ADDITIVE, finish_reason: str = "stop") -> Answer:
    alpha = 0.5 if mode is FusionMode.ADDITIVE else None  # the effective alpha, as the engine decides it
    return Answer(mode, alpha, "Left", "a", [-1.0, -2.0],
                  StageTimings(preprocess_ms=1.0, clip_ms=2.0, llm_ms=3.0, total_ms=7.0),
                  Usage(prompt_tokens=300, completion_tokens=2), finish_reason)


def test_chat_completion_shape():
    chat = P.parse_chat_request(body(model="additive", alpha=0.5, options="(a) Left (b) Right"), LIMITS)
    info = ServingInfo("tiny", True, {"llm": "1"})
    response = P.chat_completion(chat, answer(), info, ident="chatcmpl-1", created=5)
    json.dumps(response)
    assert response["object"] == "chat.completion" and response["model"] == "mofserve-additive"
    choice = response["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Left", "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert response["usage"] == {"prompt_tokens": 300, "completion_tokens": 2, "total_tokens": 302}
    ext = response["mofserve"]
    assert ext["chosen_option"] == "a" and ext["option_scores"] == [-1.0, -2.0]
    assert ext["mode"] == "additive" and ext["alpha"] == 0.5 and ext["random_weights"] is True
    assert "not meaningful" in ext["notice"]
    assert ext["timings"]["encoders_ms"] == 2.0 and ext["timings"]["total_ms"] == 7.0
    assert P.mofserve_extension(answer(), ServingInfo("paper", False))["notice"] is None
    assert P.mofserve_extension(answer(FusionMode.CLIP), info)["alpha"] is None  # the answer's, as it is


def test_a_completion_cut_at_max_tokens_finishes_with_length():
    chat = P.parse_chat_request(body(max_tokens=2), LIMITS)
    response = P.chat_completion(chat, answer(finish_reason="length"), ServingInfo("tiny", True), ident="c",
                                 created=1)
    assert response["choices"][0]["finish_reason"] == "length"


def streamed(include_usage: bool, pieces=("Le", "ft"), finish_reason: str = "stop") -> list[dict]:
    """The chunks of a streamed answer, as ``http_api`` sends them, parsed back from their SSE bytes."""
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chat = P.parse_chat_request(body(stream=True, **options), LIMITS)
    chunks = P.ChunkStream(chat, ident="chatcmpl-c", created=1)
    events = [P.sse(chunks.start()), *(P.sse(chunks.content(p)) for p in pieces),
              *(P.sse(c) for c in chunks.finish(answer(FusionMode.CLIP, finish_reason), ServingInfo("tiny", True))),
              P.SSE_DONE]
    wire = b"".join(events).decode()
    assert wire.endswith("data: [DONE]\n\n")
    frames = [frame for frame in wire.split("\n\n") if frame]
    assert all(frame.startswith("data: ") for frame in frames)
    return [json.loads(frame[len("data: "):]) for frame in frames[:-1]]


def test_stream_chunks_role_then_content_deltas_then_finish():
    chunks = streamed(include_usage=False)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-c" and c["model"] == "mofserve-clip"
               for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:3]] == ["Le", "ft"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:3])
    last = chunks[-1]
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert last["mofserve"]["chosen_option"] == "a"
    assert all("usage" not in c for c in chunks)  # as OpenAI: no usage without stream_options.include_usage


def test_stream_include_usage_adds_a_usage_chunk_with_no_choices():
    chunks = streamed(include_usage=True, finish_reason="length")
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 300, "completion_tokens": 2, "total_tokens": 302}
    assert all(c["usage"] is None for c in chunks[:-1])  # OpenAI sends "usage": null on the others
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Left"


def test_an_error_after_the_stream_began_is_an_error_event_in_openais_shape():
    event = P.sse_error(P.from_engine_error(EngineError("deadline_exceeded", "deadline: vqa_clip did not finish")))
    lines = event.decode().split("\n")
    assert lines[0] == "event: error" and lines[1].startswith("data: ") and event.endswith(b"\n\n")
    error = json.loads(lines[1][len("data: "):])["error"]
    assert error["code"] == "deadline_exceeded" and error["type"] == "server_error"
    assert error["message"].startswith("deadline:")
