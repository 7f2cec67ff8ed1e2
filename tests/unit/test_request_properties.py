"""Properties of request parsing and image decoding: whatever a client sends, the server answers
with its own error type naming a field, never with an exception of its own.

* HTTP: any JSON value as a chat-completion body, and valid bodies with one part mutated into any
  JSON value, give a ``ChatRequest`` or a ``ProtocolError`` naming a field; what parses then
  passes the engine's checks or fails them with an ``EngineError`` that maps to a status and a
  wire ``param``. Valid bodies round-trip through JSON into the request they describe.
* gRPC: any bytes given to the service's request deserializer give a message or a refusal
  naming a field (``request`` for broken framing); a string field made of invalid UTF-8 is named
  exactly, however deep; valid messages round-trip.
* Images: arbitrary bytes and real photos (``tests/fuzz/seeds.py``) with flipped bits, overwritten
  size fields and truncation give pixels or an ``ImageError``, and no pixel decode ever exceeds
  the pixel limit (every ``ImageFile.load`` is observed, before it allocates).

Every test is derandomized (a fixed example sequence, no example database), so CI sees the same
inputs on every run; ``max_examples`` keeps the whole file to seconds.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from mofserve.core.preprocessing import ImageError, ImageLimits, image_error_code, preprocess_bytes
from mofserve.core.tensors import FusionMode
from mofserve.server import openai_protocol as P
from mofserve.server.engine import ERROR_CODES, EngineError, Limits, ServingInfo, TritonEngine
from mofserve.server.grpc_service import _tolerant, _Undecodable
from mofserve.v1 import mofserve_pb2 as pb
from tests.fuzz.seeds import encode, seed_images

LIMITS = Limits(max_image_bytes=4096, max_question_chars=200, max_options_chars=200, max_new_tokens=64)
ENGINE = TritonEngine("127.0.0.1:1", ServingInfo(profile="tiny", random_weights=True), limits=LIMITS)  # never dials
PNG = seed_images()["png"]
MODES = [m.value for m in FusionMode]
# fields the engine names (their wire names differ over HTTP: ``param`` says which)
ENGINE_FIELDS = {"image", "question", "options", "max_new_tokens", "temperature", "top_p", "seed", "alpha", "mode"}
FIELD_PATH = re.compile(r"^[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*: ")


def derandomized(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# ---- HTTP: chat-completion bodies -----------------------------------------------------------------

texts = st.text(max_size=12) | st.builds(lambda a, b: f"{a}\ud800{b}", st.text(max_size=4), st.text(max_size=4))
leaves = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
          | texts)
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELD_NAMES = [*sorted(P.KNOWN_FIELDS | P.IGNORED_FIELDS | set(P.UNSUPPORTED_UNLESS_DEFAULT)), "aplha", ""]


def valid_body() -> dict:
    return {"model": "mofserve-additive", "max_tokens": 4,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Which side?"},
                                                      {"type": "image_url", "image_url": {"url": P.data_url(PNG)}}]}]}


@st.composite
def mutated_bodies(draw) -> dict:
    """A valid body with one place replaced by any JSON value (or a data URL by any text)."""
    body = valid_body()
    where = draw(st.sampled_from(["top", "message", "part", "image_url", "url", "text", "role"]))
    value = draw(json_values)
    message = body["messages"][0]
    if where == "top":
        body[draw(st.sampled_from(FIELD_NAMES))] = value
    elif where == "message":
        if draw(st.booleans()):
            body["messages"].append(value)  # a second message
        else:
            body["messages"][0] = value
    elif where == "part":
        message["content"][draw(st.integers(0, 1))] = value
    elif where == "image_url":
        message["content"][1]["image_url"] = value
    elif where == "url":
        prefix = draw(st.sampled_from(["", "data:", "data:image/png;base64,", "data:image/png,", "http://x/"]))
        message["content"][1]["image_url"]["url"] = prefix + draw(st.text(max_size=40))
    elif where == "text":
        message["content"][0]["text"] = value
    else:
        message["role"] = value
    return body


def check_refusal_names_a_field(error: P.ProtocolError) -> None:
    assert error.status in (400, 404, 413), error.message
    assert error.type == P.error_type(error.status)
    assert P.HTTP_STATUS[error.reason] == error.status, (error.reason, error.message)
    if error.param is None:
        assert error.message.startswith("body: "), error.message
    else:
        field = error.message.split(":", 1)[0]
        assert error.message.startswith(f"{error.param}:") or field in ENGINE_FIELDS, (error.param, error.message)


def parse_then_validate(body) -> P.ChatRequest | None:
    """The HTTP front-end's checks before Triton: ``parse_chat_request``, then the engine's."""
    try:
        request = P.parse_chat_request(body, LIMITS)
    except P.ProtocolError as error:
        check_refusal_names_a_field(error)
        return None
    try:
        ENGINE._check_question(request.question)
    except EngineError as error:
        assert error.code in ERROR_CODES
        assert error.field in ENGINE_FIELDS and error.message.startswith(f"{error.field}: "), error.message
        mapped = P.from_engine_error(error, request.params)
        assert mapped.status == P.HTTP_STATUS[error.code] and mapped.param, (mapped.param, error.message)
        return None
    request.question.question.encode("utf-8")  # what the engine sends to Triton
    return request


@derandomized(300)
@given(body=json_values)
def test_any_json_body_is_parsed_or_refused_naming_a_field(body):
    parse_then_validate(body)


@derandomized(400)
@given(body=mutated_bodies())
def test_valid_bodies_with_one_part_mutated_are_parsed_or_refused_naming_a_field(body):
    parse_then_validate(body)


questions = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=LIMITS.max_question_chars
                    ).filter(lambda q: q.strip() == q and q.strip())


@derandomized(200)
@given(mode=st.sampled_from(MODES), question=questions, image=st.binary(min_size=1, max_size=LIMITS.max_image_bytes),
       alpha=st.none() | st.floats(0, 1), options=st.none() | st.lists(st.text(min_size=1, max_size=6), min_size=2,
                                                                       max_size=4),
       max_tokens=st.none() | st.integers(1, LIMITS.max_new_tokens), temperature=st.none() | st.floats(0, 2),
       top_p=st.none() | st.floats(0, 1, exclude_min=True), seed=st.none() | st.integers(0, 2**63 - 1),
       stream=st.booleans(), media=st.sampled_from(["image/png", "image/jpeg", "IMAGE/WEBP"]))
def test_valid_bodies_round_trip_through_json(mode, question, image, alpha, options, max_tokens, temperature, top_p,
                                              seed, stream, media):
    if mode != "additive":
        alpha = None
    parts = [{"type": "image_url", "image_url": {"url": P.data_url(image, media)}}, {"type": "text", "text": question}]
    body = {"model": P.model_id(mode), "stream": stream, "messages": [{"role": "user", "content": parts}]}
    for name, value in (("alpha", alpha), ("options", options), ("max_tokens", max_tokens),
                        ("temperature", temperature), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            body[name] = value
    request = P.parse_chat_request(json.loads(json.dumps(body, allow_nan=False)), LIMITS)
    assert request.model == P.model_id(mode) and request.selection.mode is FusionMode(mode)
    assert request.selection.alpha == alpha and request.stream is stream
    q = request.question
    assert q.image == image and q.question == question
    assert q.options == (None if options is None else json.dumps(options, ensure_ascii=False))
    g = q.generation
    assert (g.max_new_tokens, g.temperature, g.top_p, g.seed) == (max_tokens, temperature, top_p, seed)


# ---- gRPC: request messages -----------------------------------------------------------------------------

REQUESTS = [pb.AskRequest, pb.CompareRequest, pb.EncodeRequest, pb.EmbedRequest, pb.EmbedTextRequest]


@derandomized(400)
@given(cls=st.sampled_from(REQUESTS), raw=st.binary(max_size=256))
def test_any_bytes_parse_to_a_message_or_a_refusal_naming_a_field(cls, raw):
    parsed = _tolerant(cls)(raw)
    if isinstance(parsed, _Undecodable):
        assert FIELD_PATH.match(parsed.message), parsed.message
        assert parsed.error.code == "invalid_argument"
        assert parsed.error.field is None or parsed.message.startswith(f"{parsed.error.field}: "), parsed.message
        broken = f"request: not a valid {cls.DESCRIPTOR.full_name}"
        assert "UTF-8" in parsed.message or parsed.message.startswith(broken), parsed.message
    else:
        assert isinstance(parsed, cls)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def _is_bad_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


bad_utf8 = st.binary(min_size=1, max_size=12).filter(_is_bad_utf8)
plain = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)


@derandomized(300)
@given(target=st.sampled_from(["question", "options", "mode", "modes.mode", "texts"]), bad=bad_utf8,
       question=plain, options=plain, n_modes=st.integers(0, 3), n_texts=st.integers(0, 3))
def test_invalid_utf8_in_any_string_field_is_refused_naming_that_field(target, bad, question, options, n_modes,
                                                                        n_texts):
    if target in ("question", "options", "mode"):
        cls = pb.AskRequest
        raw = pb.AskRequest(image=PNG, question=question, options=options).SerializeToString()
        number = cls.DESCRIPTOR.fields_by_name[target].number
        raw += _length_delimited(number, bad)  # the last value of a string field is the one parsed
        expected = f"{target}: "
    elif target == "modes.mode":
        cls = pb.CompareRequest
        raw = pb.CompareRequest(question=question, modes=[pb.ModeSelection(mode="clip")] * n_modes).SerializeToString()
        raw += _length_delimited(4, _length_delimited(1, bad))
        expected = f"modes[{n_modes}].mode: "
    else:
        cls = pb.EmbedTextRequest
        raw = pb.EmbedTextRequest(texts=[question or "x"] * n_texts).SerializeToString() + _length_delimited(1, bad)
        expected = f"texts[{n_texts}]: "
    parsed = _tolerant(cls)(raw)
    assert isinstance(parsed, _Undecodable)
    assert parsed.message.startswith(expected) and "not valid UTF-8" in parsed.message, parsed.message
    assert parsed.error.field == expected[:-2]  # the field as data, not only in the text


@derandomized(200)
@given(image=st.binary(max_size=64), question=plain, options=plain, mode=plain, alpha=st.none() | st.floats(),
       max_new_tokens=st.none() | st.integers(-(2**31), 2**31 - 1))
def test_valid_messages_round_trip(image, question, options, mode, alpha, max_new_tokens):
    request = pb.AskRequest(image=image, question=question, options=options, mode=mode,
                            generation=pb.GenerationParams(max_new_tokens=max_new_tokens))
    if alpha is not None:
        request.alpha = alpha
    parsed = _tolerant(pb.AskRequest)(request.SerializeToString())
    assert isinstance(parsed, pb.AskRequest)
    if alpha is not None and math.isnan(alpha):
        assert math.isnan(parsed.alpha)
        parsed.alpha = request.alpha = 0.0
    assert parsed == request


# ---- images ---------------------------------------------------------------------------------------------

IMAGE_LIMITS = ImageLimits(max_bytes=1 << 16, max_pixels=200_000)
SEEDS = seed_images()


@contextmanager
def pixel_decodes():
    """Every size Pillow is about to decode pixels for (``ImageFile.load``, before it allocates)."""
    sizes: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def recording_load(self):
        sizes.append(self.size)
        return original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", recording_load)
        yield sizes


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 6))):  # bit flips anywhere
        where = draw(st.integers(0, len(data) - 1))
        data[where] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):  # a size field lying: any 4 bytes of the header rewritten
        where = draw(st.integers(0, min(60, len(data) - 4)))
        data[where:where + 4] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, draw(st.sampled_from(["big", "little"])))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")
@derandomized(400)
@given(data=st.binary(max_size=2048) | mutated_images())
def test_arbitrary_and_mutated_images_give_pixels_or_an_image_error_within_the_pixel_limit(data):
    with pixel_decodes() as sizes:
        try:
            pixels = preprocess_bytes(data, 16, limits=IMAGE_LIMITS)
        except ImageError as error:
            assert str(error).startswith("image: ") and error.code in ("invalid", "too_large")
            assert image_error_code(str(error)) == error.code  # what the front-end reads back from Triton
        else:
            assert pixels.shape == (3, 16, 16) and np.isfinite(pixels).all()
    assert all(w * h <= IMAGE_LIMITS.max_pixels for w, h in sizes), sizes


def test_the_pixel_limit_is_observed_before_decoding():
    """The observation above can fail: a seed decodes only when max_pixels admits its size."""
    with pixel_decodes() as sizes:
        preprocess_bytes(SEEDS["png"], 16, limits=IMAGE_LIMITS)
    assert set(sizes) == {(40, 28)}  # load() is called again by conversions, decoding nothing more
    with pixel_decodes() as sizes, pytest.raises(ImageError, match="max_pixels"):
        preprocess_bytes(SEEDS["png"], 16, limits=ImageLimits(max_pixels=40 * 28 - 1))
    assert sizes == []


def test_image_error_code_reads_each_refusal_back_from_its_text():
    """Triton passes only the text of the preprocess model's error: the status must survive it."""
    png = SEEDS["png"]
    refusals = {
        "max_bytes": (png, ImageLimits(max_bytes=len(png) - 1)),
        "max_pixels": (png, ImageLimits(max_pixels=100)),
        "max_aspect_ratio": (encode(Image.new("L", (1, 100)), "PNG"), ImageLimits()),
        "min_side": (png, ImageLimits(min_side=30)),
        "truncated": (png[: len(png) // 2], ImageLimits()),
        "not an image": (b"hello, world" * 4, ImageLimits()),
    }
    codes = {}
    for name, (data, limits) in refusals.items():
        with pytest.raises(ImageError) as info:
            preprocess_bytes(data, 16, limits=limits)
        codes[name] = info.value.code
        assert image_error_code(str(info.value)) == info.value.code, (name, str(info.value))
    assert codes == {"max_bytes": "too_large", "max_pixels": "too_large", "max_aspect_ratio": "invalid",
                     "min_side": "invalid", "truncated": "invalid", "not an image": "invalid"}
