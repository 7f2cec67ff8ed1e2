"""Bad input, everywhere a request enters: one table of cases, run on both transports.

Each row of ``CASES`` says how to build the bad request over gRPC (Ask, or the RPC the case is
about: Compare, Encode, Embed, EmbedText) and over HTTP (``POST /v1/chat/completions``), which
status each transport must answer and what the message must name (the field, and the limit or
the value). After every bad request the same server answers a good one and its health is
SERVING / 200. Valid but unusual images (animated GIF, 16-bit and palette PNG, CMYK JPEG,
EXIF-rotated, 1x1) must succeed, and decode to the right pixels: the server's embedding of each
equals its embedding of a plain PNG of the expected pixels, built here without mofserve's code.

The servers run on the tiny Triton with small front-end limits (``LIMITS``), so that "over the
limit" costs kilobytes, not tens of megabytes; the pixel limit is the model's own (40 M pixels).
``docs/reliability.md`` ("Bad input") holds the table this file renders (``error_table``);
``test_docs_error_table_matches_the_battery`` keeps the two equal.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import skimage
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageDraw

from mofserve.core.preprocessing import DEFAULT_LIMITS
from mofserve.server.engine import Limits, TritonEngine
from mofserve.server.grpc_service import SERVICE_NAME, build_grpc_server
from mofserve.server.http_api import build_http_app, default_max_body_bytes, start_http
from mofserve.server.openai_protocol import data_url
from mofserve.v1 import mofserve_pb2 as pb
from mofserve.v1 import mofserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

LIMITS = Limits(max_image_bytes=256 << 10)
MAX_MESSAGE = LIMITS.max_image_bytes + (1 << 20)  # grpc_service's default: the image limit + 1 MiB
MAX_BODY = default_max_body_bytes(LIMITS.max_image_bytes)
MAX_PIXELS = DEFAULT_LIMITS.max_pixels  # checked by the Triton preprocess model
DATA = Path(skimage.data_dir)
QUESTION = "Which side is the red disc on?"
OPTIONS = "(a) Left (b) Right"
IMAGE_PARAM = "messages[0].content[1].image_url.url"
QUESTION_PARAM = "messages[0].content"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


# ---- images ---------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def drawing(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A white card with a red disc on the left and a blue bar along the bottom: asymmetric, so
    any rotation or flip changes it."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w // 10, h // 4, w // 10 + h // 2, h // 4 + h // 2), fill=(220, 20, 20))
    draw.rectangle((0, h - h // 8, w - 1, h - 1), fill=(20, 20, 200))
    return image


def photo(name: str = "chelsea.png", size: tuple[int, int] = (96, 64)) -> Image.Image:
    return Image.open(DATA / name).convert("RGB").resize(size, Image.Resampling.BICUBIC)


IMAGE = encode(drawing())
PHOTO_JPEG = encode(photo(), "JPEG", quality=90)


@cache
def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, written row by row (a real decompression bomb:
    20000x20000 is 50 MB of scanlines in ~50 kB) without ever holding the pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@cache
def corrupt_png() -> bytes:
    """A PNG whose compressed pixel data is overwritten in the middle (the CRC no longer matches)."""
    data = bytearray(encode(photo()))
    start = data.index(b"IDAT") + 4
    for i in range(start + 40, start + 80):
        data[i] ^= 0x5A
    return bytes(data)


# ---- requests ---------------------------------------------------------------------------------------


def ask_pb(image: bytes = IMAGE, question: str = QUESTION, options: str = OPTIONS, mode: str = "interleaved",
           alpha: float | None = None, **generation: Any) -> pb.AskRequest:
    request = pb.AskRequest(image=image, question=question, options=options, mode=mode,
                            generation=pb.GenerationParams(**generation))
    if alpha is not None:
        request.alpha = alpha
    return request


def chat_body(image: bytes | None = IMAGE, question: str = QUESTION, url: str | None = None, mode: str = "interleaved",
              parts: list | None = None, **extra: Any) -> dict:
    """A chat completion body; ``extra`` are top-level fields (``alpha``, ``options``, ``n``, ...)."""
    if parts is None:
        parts = [{"type": "text", "text": question},
                 {"type": "image_url", "image_url": {"url": url if url is not None else data_url(image)}}]
    return {"model": f"mofserve-{mode}", "messages": [{"role": "user", "content": parts}], "max_tokens": 2, **extra}


def json_bytes(body: Any) -> bytes:
    return json.dumps(body).encode()


def raw_with_invalid_utf8(message, placeholder: str) -> bytes:
    """``message`` serialised, with the string ``placeholder`` replaced by invalid UTF-8 bytes of the
    same length (so the framing stays valid and only the string's encoding is wrong)."""
    raw = message.SerializeToString()
    encoded = placeholder.encode()
    assert raw.count(encoded) == 1
    return raw.replace(encoded, b"\xff\xfe" + encoded[2:])


GRPC_METHODS = {"Ask": (pb.AskRequest, pb.AskResponse), "Compare": (pb.CompareRequest, pb.CompareResponse),
                "Encode": (pb.EncodeRequest, pb.EncodeResponse), "Embed": (pb.EmbedRequest, pb.EmbedResponse),
                "EmbedText": (pb.EmbedTextRequest, pb.EmbedTextResponse)}


@dataclass(frozen=True)
class Case:
    """One bad input; ``grpc`` / ``http`` build the request (None: the transport cannot carry it).

    ``grpc`` returns ``(method, message or raw bytes)``; ``http`` returns ``(body bytes, content
    type)``. Each transport's message must contain every fragment of its tuple; for HTTP, ``param``
    is the OpenAI ``error.param`` (the wire field; None for the body as a whole)."""

    name: str
    what: str
    grpc: Callable[[], tuple[str, Any]] | None = None
    grpc_status: str | None = None
    grpc_fragments: tuple[str, ...] = ()
    http: Callable[[], tuple[bytes, str | None]] | None = None
    http_status: int | None = None
    http_fragments: tuple[str, ...] = ()
    param: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)


def ask(**kw: Any) -> Callable[[], tuple[str, Any]]:
    return lambda: ("Ask", ask_pb(**kw))


def rpc(method: str, build: Callable[[], Any]) -> Callable[[], tuple[str, Any]]:
    return lambda: (method, build())


def chat(**kw: Any) -> Callable[[], tuple[bytes, str | None]]:
    return lambda: (json_bytes(chat_body(**kw)), "application/json")


def raw_http(build: Callable[[], bytes], content_type: str | None = "application/json"
             ) -> Callable[[], tuple[bytes, str | None]]:
    return lambda: (build(), content_type)


TOO_BIG = LIMITS.max_image_bytes + 1
BIG_LIMIT = str(LIMITS.max_image_bytes)

CASES = [
    # -- images: refused ----------------------------------------------------------------------------------
    Case("empty image", "0 bytes",
         ask(image=b""), "INVALID_ARGUMENT", ("image:", "empty"),
         chat(url="data:image/png;base64,"), 400, ("no image data",), IMAGE_PARAM),
    Case("truncated JPEG", "first half of a JPEG photo",
         ask(image=PHOTO_JPEG[: len(PHOTO_JPEG) // 2]), "INVALID_ARGUMENT", ("image:", "JPEG", "truncated"),
         chat(image=PHOTO_JPEG[: len(PHOTO_JPEG) // 2]), 400, ("image:", "JPEG", "truncated"), IMAGE_PARAM),
    Case("corrupt PNG", "PNG with 40 bytes of its pixel data overwritten",
         ask(image=corrupt_png()), "INVALID_ARGUMENT", ("image:", "PNG"),
         chat(image=corrupt_png()), 400, ("image:", "PNG"), IMAGE_PARAM),
    Case("not an image", "plain text bytes",
         ask(image=b"%PDF-1.4 this is not an image" * 4), "INVALID_ARGUMENT",
         ("image:", "not a JPEG/PNG/WebP/GIF/BMP/TIFF image"),
         chat(image=b"%PDF-1.4 this is not an image" * 4), 400, ("image:", "not a JPEG/PNG/WebP/GIF/BMP/TIFF"),
         IMAGE_PARAM),
    Case("image over the byte limit", f"{TOO_BIG} bytes (limit {BIG_LIMIT})",
         ask(image=b"\xff\xd8\xff" + bytes(TOO_BIG - 3)), "RESOURCE_EXHAUSTED",
         ("image:", str(TOO_BIG), BIG_LIMIT, "max_image_bytes"),
         chat(image=b"\xff\xd8\xff" + bytes(TOO_BIG - 3)), 413, (str(TOO_BIG), BIG_LIMIT, "max_image_bytes"),
         IMAGE_PARAM),
    Case("pixel bomb over max_pixels", "valid 7000x6000 1-bit PNG (5 kB, 42 M pixels)",
         ask(image=bilevel_png(7000, 6000)), "RESOURCE_EXHAUSTED",
         ("image:", "7000x6000", str(MAX_PIXELS), "max_pixels"),
         chat(image=bilevel_png(7000, 6000)), 413, ("image:", str(MAX_PIXELS), "max_pixels"), IMAGE_PARAM),
    Case("pixel bomb over Pillow's limit", "valid 20000x20000 1-bit PNG (49 kB, 400 M pixels)",
         ask(image=bilevel_png(20000, 20000)), "RESOURCE_EXHAUSTED",
         ("image:", "400000000 pixels", str(MAX_PIXELS), "max_pixels"),
         chat(image=bilevel_png(20000, 20000)), 413, ("image:", "400000000", "max_pixels"), IMAGE_PARAM),
    Case("extreme aspect ratio (tall)", "1x100 PNG",
         ask(image=encode(Image.new("L", (1, 100)))), "INVALID_ARGUMENT",
         ("image:", "1x100", "50:1", "max_aspect_ratio"),
         chat(image=encode(Image.new("L", (1, 100)))), 400, ("image:", "1x100", "max_aspect_ratio"), IMAGE_PARAM),
    Case("extreme aspect ratio (wide)", "10000x1 PNG",
         ask(image=encode(Image.new("L", (10000, 1)))), "INVALID_ARGUMENT", ("image:", "10000x1", "max_aspect_ratio"),
         chat(image=encode(Image.new("L", (10000, 1)))), 400, ("image:", "10000x1", "max_aspect_ratio"),
         IMAGE_PARAM),
    # -- images in the other RPCs -------------------------------------------------------------------------
    Case("bad image in Encode", "Encode with a truncated JPEG",
         rpc("Encode", lambda: pb.EncodeRequest(image=PHOTO_JPEG[:200], mode="clip")), "INVALID_ARGUMENT",
         ("image:", "JPEG")),
    Case("empty image in Embed", "Embed with images[1] empty",
         rpc("Embed", lambda: pb.EmbedRequest(images=[IMAGE, b""])), "INVALID_ARGUMENT", ("images[1]:", "empty")),
    Case("oversize image in Embed", f"Embed with images[0] of {TOO_BIG} bytes",
         rpc("Embed", lambda: pb.EmbedRequest(images=[bytes(TOO_BIG)])), "RESOURCE_EXHAUSTED",
         ("images[0]:", BIG_LIMIT, "max_image_bytes")),
    Case("pixel bomb in Embed", "Embed with a 7000x6000 PNG",
         rpc("Embed", lambda: pb.EmbedRequest(images=[bilevel_png(7000, 6000)])), "RESOURCE_EXHAUSTED",
         ("image", str(MAX_PIXELS), "max_pixels")),
    # -- counts -------------------------------------------------------------------------------------------
    Case("too many images", f"Embed with {LIMITS.max_embed_images + 1} images; chat with 2 image parts",
         rpc("Embed", lambda: pb.EmbedRequest(images=[IMAGE] * (LIMITS.max_embed_images + 1))),
         "INVALID_ARGUMENT", ("images:", str(LIMITS.max_embed_images + 1), str(LIMITS.max_embed_images),
                              "max_embed_images"),
         chat(parts=[{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                     {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]),
         400, ("exactly one image_url", "got 2"), QUESTION_PARAM),
    Case("no images", "Embed with no image",
         rpc("Embed", lambda: pb.EmbedRequest()), "INVALID_ARGUMENT", ("images:", "at least one")),
    Case("too many modes", f"Compare with {LIMITS.max_compare_modes + 1} modes",
         rpc("Compare", lambda: pb.CompareRequest(image=IMAGE, question=QUESTION, modes=[
             pb.ModeSelection(mode="clip")] * (LIMITS.max_compare_modes + 1))), "INVALID_ARGUMENT",
         ("modes:", str(LIMITS.max_compare_modes), "max_compare_modes")),
    Case("too many texts", f"EmbedText with {LIMITS.max_embed_texts + 1} texts",
         rpc("EmbedText", lambda: pb.EmbedTextRequest(texts=["a dog"] * (LIMITS.max_embed_texts + 1))),
         "INVALID_ARGUMENT", ("texts:", str(LIMITS.max_embed_texts), "max_embed_texts")),
    # -- text -----------------------------------------------------------------------------------------------
    Case("empty question", "question of spaces only",
         ask(question="   "), "INVALID_ARGUMENT", ("question:", "empty"),
         chat(question="   "), 400, ("content", "question is required"), QUESTION_PARAM),
    Case("over-long question", f"{LIMITS.max_question_chars + 1} characters",
         ask(question="x" * (LIMITS.max_question_chars + 1)), "INVALID_ARGUMENT",
         ("question:", str(LIMITS.max_question_chars + 1), str(LIMITS.max_question_chars), "max_question_chars"),
         chat(question="x" * (LIMITS.max_question_chars + 1)), 400,
         (str(LIMITS.max_question_chars), "max_question_chars"), QUESTION_PARAM),
    Case("over-long text", f"EmbedText with a text of {LIMITS.max_text_chars + 1} characters",
         rpc("EmbedText", lambda: pb.EmbedTextRequest(texts=["ok", "y" * (LIMITS.max_text_chars + 1)])),
         "INVALID_ARGUMENT", ("texts[1]:", str(LIMITS.max_text_chars), "max_text_chars")),
    Case("invalid UTF-8 question", "question bytes 0xff 0xfe; HTTP: the JSON body not UTF-8",
         lambda: ("Ask", raw_with_invalid_utf8(ask_pb(question="QQQQ which side?"), "QQQQ")), "INVALID_ARGUMENT",
         ("question:", "UTF-8"),
         raw_http(lambda: json_bytes(chat_body(question="QQQQ which side?")).replace(b"QQQQ", b"\xff\xfeQQ")),
         400, ("body:", "UTF-8"), None),
    Case("invalid UTF-8 mode in Compare", "modes[1].mode bytes 0xff 0xfe",
         lambda: ("Compare", raw_with_invalid_utf8(pb.CompareRequest(image=IMAGE, question=QUESTION, modes=[
             pb.ModeSelection(mode="clip"), pb.ModeSelection(mode="MMMM")]), "MMMM")), "INVALID_ARGUMENT",
         ("modes[1].mode:", "UTF-8")),
    Case("invalid UTF-8 text in EmbedText", "texts[0] bytes 0xff 0xfe",
         lambda: ("EmbedText", raw_with_invalid_utf8(pb.EmbedTextRequest(texts=["TTTT dog"]), "TTTT")),
         "INVALID_ARGUMENT", ("texts[0]:", "UTF-8")),
    Case("lone surrogate in the question", "JSON escape \\ud800 (valid JSON, not encodable as UTF-8)",
         http=raw_http(lambda: json_bytes(chat_body(question="which \ud800 side?"))), http_status=400,
         http_fragments=("question", "UTF-8"), param=QUESTION_PARAM),
    Case("malformed protobuf", "Ask with a truncated message",
         lambda: ("Ask", ask_pb().SerializeToString()[:-5]), "INVALID_ARGUMENT",
         ("request:", "mofserve.v1.AskRequest")),
    # -- modes and alpha ------------------------------------------------------------------------------------
    Case("unknown fusion mode", "mode 'bogus'; HTTP model 'mofserve-bogus'",
         ask(mode="bogus"), "INVALID_ARGUMENT", ("mode:", "bogus"),
         chat(mode="bogus"), 404, ("model:", "bogus", "mofserve-interleaved"), "model"),
    Case("unknown mode in Compare", "modes[1].mode 'nope'",
         rpc("Compare", lambda: pb.CompareRequest(image=IMAGE, question=QUESTION, modes=[
             pb.ModeSelection(mode="clip"), pb.ModeSelection(mode="nope")])), "INVALID_ARGUMENT",
         ("modes[1].mode:", "nope")),
    Case("unknown mode in Encode", "Encode mode 'bogus'",
         rpc("Encode", lambda: pb.EncodeRequest(image=IMAGE, mode="bogus")), "INVALID_ARGUMENT", ("mode:", "bogus")),
    Case("alpha above 1", "alpha 1.5 (additive)",
         ask(mode="additive", alpha=1.5), "INVALID_ARGUMENT", ("alpha:", "[0, 1]", "1.5"),
         chat(mode="additive", alpha=1.5), 400, ("alpha:", "[0, 1]", "1.5"), "alpha"),
    Case("alpha below 0", "alpha -0.1 (additive)",
         ask(mode="additive", alpha=-0.1), "INVALID_ARGUMENT", ("alpha:", "[0, 1]"),
         chat(mode="additive", alpha=-0.1), 400, ("alpha:", "[0, 1]"), "alpha"),
    Case("alpha NaN", "alpha NaN (JSON NaN literal over HTTP)",
         ask(mode="additive", alpha=float("nan")), "INVALID_ARGUMENT", ("alpha:", "[0, 1]", "nan"),
         chat(mode="additive", alpha=float("nan")), 400, ("alpha:", "[0, 1]", "nan"), "alpha"),
    Case("alpha with a non-additive mode", "alpha 0.5 with mode clip",
         ask(mode="clip", alpha=0.5), "INVALID_ARGUMENT", ("alpha:", "additive"),
         chat(mode="clip", alpha=0.5), 400, ("alpha:", "additive"), "alpha"),
    Case("alpha NaN in Compare", "modes[0].alpha NaN",
         rpc("Compare", lambda: pb.CompareRequest(image=IMAGE, question=QUESTION, modes=[
             pb.ModeSelection(mode="additive", alpha=float("nan"))])), "INVALID_ARGUMENT",
         ("modes[0].alpha:", "[0, 1]")),
    # -- options and generation ----------------------------------------------------------------------------
    Case("malformed options", "options 'a) Left b) Right'",
         ask(options="a) Left b) Right"), "INVALID_ARGUMENT", ("options:",),
         chat(options="a) Left b) Right"), 400, ("options:",), "options"),
    Case("options of the wrong type", "options 5 (HTTP)",
         http=chat(options=5), http_status=400, http_fragments=("options:", "int"), param="options"),
    Case("over-long options", f"{LIMITS.max_options_chars + 1} characters",
         ask(options="(a) " + "x" * LIMITS.max_options_chars), "INVALID_ARGUMENT",
         ("options:", str(LIMITS.max_options_chars), "max_options_chars"),
         chat(options="(a) " + "x" * LIMITS.max_options_chars), 400,
         ("options:", str(LIMITS.max_options_chars), "max_options_chars"), "options"),
    Case("max_new_tokens over the limit", f"{LIMITS.max_new_tokens + 1} (HTTP max_tokens)",
         ask(max_new_tokens=LIMITS.max_new_tokens + 1), "INVALID_ARGUMENT",
         ("max_new_tokens:", str(LIMITS.max_new_tokens)),
         chat(max_tokens=LIMITS.max_new_tokens + 1), 400, ("max_tokens:", str(LIMITS.max_new_tokens)), "max_tokens"),
    Case("temperature NaN", "temperature NaN",
         ask(temperature=float("nan")), "INVALID_ARGUMENT", ("temperature:", "[0, 2]"),
         chat(temperature=float("nan")), 400, ("temperature:", "[0, 2]"), "temperature"),
    Case("top_p of the wrong type", "top_p 'high' (HTTP)",
         http=chat(top_p="high"), http_status=400, http_fragments=("top_p:", "number"), param="top_p"),
    # -- fields and framing ---------------------------------------------------------------------------------
    Case("unknown top-level field", "'aplha': 0.5 (HTTP)",
         http=chat(aplha=0.5), http_status=400, http_fragments=("aplha:", "unrecognized"), param="aplha"),
    Case("unsupported parameter: n=2", "n 2 (HTTP)",
         http=chat(n=2), http_status=400, http_fragments=("n:", "n=1", "2"), param="n"),
    Case("unsupported parameter: logprobs", "logprobs true (HTTP)",
         http=chat(logprobs=True), http_status=400, http_fragments=("logprobs:", "not supported"), param="logprobs"),
    Case("unsupported parameter: tools", "a tool definition (HTTP)",
         http=chat(tools=[{"type": "function", "function": {"name": "f"}}]), http_status=400,
         http_fragments=("tools:", "not supported"), param="tools"),
    Case("oversize message", f"2 MiB Ask (limit {MAX_MESSAGE}); HTTP body of 2 MiB (limit {MAX_BODY})",
         ask(image=bytes(2 << 20)), "RESOURCE_EXHAUSTED", (str(MAX_MESSAGE),),
         raw_http(lambda: json_bytes(chat_body(image=bytes(2 << 20)))), 413,
         ("body:", str(MAX_BODY), "max_body_bytes"), None),
    Case("invalid JSON", "a truncated JSON object (HTTP)",
         http=raw_http(lambda: b'{"model": "mofserve-clip", '), http_status=400, http_fragments=("body:", "JSON")),
    Case("JSON that is not an object", "[1, 2] (HTTP)",
         http=raw_http(lambda: b"[1, 2]"), http_status=400, http_fragments=("body:", "object", "list")),
    Case("data URL not base64", "data:image/png;base64,%%%",
         http=chat(url="data:image/png;base64,%%%not-base64%%%"), http_status=400,
         http_fragments=("image_url.url:", "base64"), param=IMAGE_PARAM),
    Case("data URL with a non-image media type", "data:text/plain;base64,...",
         http=chat(url="data:text/plain;base64," + base64.b64encode(IMAGE).decode()), http_status=400,
         http_fragments=("image_url.url:", "image/*", "text/plain"), param=IMAGE_PARAM),
    Case("data URL without base64", "data:image/png,<raw>",
         http=chat(url="data:image/png,abc"), http_status=400, http_fragments=("image_url.url:", "base64"),
         param=IMAGE_PARAM),
    Case("remote image URL", "https://example.com/dog.png",
         http=chat(url="https://example.com/dog.png"), http_status=400,
         http_fragments=("image_url.url:", "never reaches the network"), param=IMAGE_PARAM),
    Case("not a URL", "'dog.png'",
         http=chat(url="dog.png"), http_status=400, http_fragments=("image_url.url:", "data URL"), param=IMAGE_PARAM),
    Case("wrong content type", "text/plain (HTTP)",
         http=raw_http(lambda: json_bytes(chat_body()), "text/plain"), http_status=415,
         http_fragments=("content-type:", "application/json", "text/plain")),
    Case("no content type", "no Content-Type header (HTTP)",
         http=raw_http(lambda: json_bytes(chat_body()), None), http_status=415,
         http_fragments=("content-type:", "application/json")),
    Case("form-encoded body", "application/x-www-form-urlencoded (HTTP)",
         http=raw_http(lambda: b"model=mofserve-clip", "application/x-www-form-urlencoded"), http_status=415,
         http_fragments=("content-type:", "application/json")),
]
CASE_IDS = [case.name for case in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS)


# ---- servers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frontends(loop_thread, tiny_triton, engine, metrics):
    """Both front-ends on one engine with ``LIMITS`` (the session's Triton and metrics)."""
    small = TritonEngine(tiny_triton.grpc_url, engine.info, limits=LIMITS, max_batch_size=engine.max_batch_size)

    async def start():
        server, grpc_port, _ = build_grpc_server(small, metrics, port=0)
        await server.start()
        runner, http_port = await start_http(build_http_app(small, metrics), port=0)
        return server, grpc_port, runner, http_port

    server, grpc_port, runner, http_port = loop_thread.run(start())
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        yield SimpleNamespace(channel=channel, stub=pb_grpc.MofServeStub(channel), http_port=http_port,
                              health=health_pb2_grpc.HealthStub(channel))
    loop_thread.run(runner.cleanup())
    loop_thread.run(server.stop(None))
    loop_thread.run(small.close())


def call_raw(channel: grpc.Channel, method: str, request: Any, timeout: float = 60) -> bytes:
    """A unary call with identity (de)serialisers: ``request`` goes on the wire as given."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    return channel.unary_unary(f"/{SERVICE_NAME}/{method}")(raw, timeout=timeout)


def post(port: int, body: bytes, content_type: str | None, path: str = "/v1/chat/completions"
         ) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {} if content_type is None else {"Content-Type": content_type}
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def get(port: int, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def good_grpc(frontends) -> None:
    answer = frontends.stub.Ask(ask_pb(max_new_tokens=1), timeout=60)
    assert answer.chosen_option in ("a", "b")
    status = frontends.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def good_http(frontends) -> None:
    status, payload = post(frontends.http_port, json_bytes(chat_body(options=OPTIONS)), "application/json")
    assert status == 200, payload
    assert payload["mofserve"]["chosen_option"] in ("a", "b")
    assert get(frontends.http_port, "/healthz") == 200


def grpc_error(frontends, case: Case) -> grpc.RpcError:
    method, request = case.grpc()
    with pytest.raises(grpc.RpcError) as error:
        call_raw(frontends.channel, method, request)
    return error.value


def check_grpc(frontends, case: Case) -> None:
    error = grpc_error(frontends, case)
    details = error.details() or ""
    assert error.code() == grpc.StatusCode[case.grpc_status], f"{case.name}: {error.code()} {details}"
    for fragment in case.grpc_fragments:
        assert fragment in details, f"{case.name}: {fragment!r} not in {details!r}"


def check_http(frontends, case: Case) -> None:
    body, content_type = case.http()
    status, payload = post(frontends.http_port, body, content_type)
    assert status == case.http_status, f"{case.name}: {status} {payload}"
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == case.param, f"{case.name}: {error}"
    for fragment in case.http_fragments:
        assert fragment in error["message"], f"{case.name}: {fragment!r} not in {error['message']!r}"


# ---- the battery ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c.grpc], ids=[c.name for c in CASES if c.grpc])
def test_bad_input_over_grpc_names_the_field_and_the_server_goes_on(frontends, case):
    check_grpc(frontends, case)
    good_grpc(frontends)


@pytest.mark.parametrize("case", [c for c in CASES if c.http], ids=[c.name for c in CASES if c.http])
def test_bad_input_over_http_names_the_field_and_the_server_goes_on(frontends, case):
    check_http(frontends, case)
    good_http(frontends)


ASK_CASES = [c for c in CASES if c.grpc and c.grpc()[0] == "Ask"]


def _streamed_chat(case: Case) -> bytes | None:
    """The case's chat body with ``"stream": true``, or None when it is not a JSON object."""
    body, content_type = case.http()
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if content_type != "application/json" or not isinstance(payload, dict):
        return None
    return json_bytes({**payload, "stream": True})


STREAM_HTTP_CASES = [c for c in CASES if c.http and _streamed_chat(c) is not None]


@pytest.mark.parametrize("case", ASK_CASES, ids=[c.name for c in ASK_CASES])
def test_bad_input_over_ask_stream_gets_the_status_of_ask_and_the_server_goes_on(frontends, case):
    """The same refusals when the answer would stream: the status comes before any token."""
    _, request = case.grpc()
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    call = frontends.channel.unary_stream(f"/{SERVICE_NAME}/AskStream")(raw, timeout=60)
    with pytest.raises(grpc.RpcError) as error:
        for _ in call:
            pass
    details = error.value.details() or ""
    assert error.value.code() == grpc.StatusCode[case.grpc_status], f"{case.name}: {error.value.code()} {details}"
    for fragment in case.grpc_fragments:
        assert fragment in details, f"{case.name}: {fragment!r} not in {details!r}"
    good_grpc(frontends)


@pytest.mark.parametrize("case", STREAM_HTTP_CASES, ids=[c.name for c in STREAM_HTTP_CASES])
def test_bad_input_with_stream_true_keeps_its_http_status_and_the_server_goes_on(frontends, case):
    """An error before the first SSE chunk is an ordinary HTTP error, as without streaming."""
    status, payload = post(frontends.http_port, _streamed_chat(case), "application/json")
    assert status == case.http_status, f"{case.name}: {status} {payload}"
    assert payload["error"]["param"] == case.param, f"{case.name}: {payload}"
    for fragment in case.http_fragments:
        assert fragment in payload["error"]["message"], f"{case.name}: {fragment!r} not in {payload}"
    good_http(frontends)


def test_unknown_protobuf_fields_are_ignored_as_protobuf_intends(frontends):
    """A newer client's extra field (number 99 here) must not break an older server."""
    raw = ask_pb(max_new_tokens=1).SerializeToString() + b"\x98\x06\x01"  # field 99, varint 1
    response = pb.AskResponse.FromString(call_raw(frontends.channel, "Ask", raw))
    assert response.chosen_option in ("a", "b")


def test_good_traffic_alongside_the_whole_battery_loses_nothing(frontends):
    """Every case on both transports while another thread keeps asking good questions: each bad
    request gets its status, and every good one its answer (requests lost: zero)."""
    stop = threading.Event()
    answered: list[str] = []
    failures: list[str] = []

    def steady() -> None:
        while not stop.is_set():
            try:
                answered.append(frontends.stub.Ask(ask_pb(max_new_tokens=1), timeout=60).chosen_option)
            except grpc.RpcError as error:  # pragma: no cover - the assertion below reports it
                failures.append(f"{error.code()}: {error.details()}")

    worker = threading.Thread(target=steady, daemon=True)
    worker.start()
    started = time.monotonic()
    tried = 0
    try:
        for case in CASES:
            if case.grpc:
                check_grpc(frontends, case)
                tried += 1
            if case.http:
                check_http(frontends, case)
                tried += 1
    finally:
        stop.set()
        worker.join(60)
    assert not failures, failures
    assert answered and all(letter in ("a", "b") for letter in answered)
    assert tried == sum(bool(c.grpc) + bool(c.http) for c in CASES)
    assert time.monotonic() - started < 120
    good_grpc(frontends)
    good_http(frontends)


# ---- valid but unusual images ------------------------------------------------------------------------


def rgb_png(image: Image.Image) -> bytes:
    return encode(image.convert("RGB"))


def exif_rotated_jpeg() -> tuple[bytes, bytes, bytes]:
    """A JPEG stored sideways with EXIF orientation 6 (display = rotate 90 degrees clockwise)."""
    stored = drawing((64, 96)).transpose(Image.Transpose.ROTATE_90)  # lies on its side
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    pixels = Image.open(io.BytesIO(data)).convert("RGB")  # Pillow's open() never rotates
    return data, rgb_png(pixels.transpose(Image.Transpose.ROTATE_270)), rgb_png(pixels)


def animated_gif() -> tuple[bytes, bytes, bytes]:
    data = (DATA / "no_time_for_that_tiny.gif").read_bytes()
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames > 1
        first = gif.convert("RGB")
        gif.seek(gif.n_frames // 2)
        later = gif.convert("RGB")
    return data, rgb_png(first), rgb_png(later)


def sixteen_bit_png() -> tuple[bytes, bytes, bytes]:
    ramp = np.linspace(0, 65535, 64 * 48, dtype=np.float64).reshape(48, 64)
    ramp[:, :20] = 30000  # a mid-grey band: clipping at 255 would make it white
    wide = ramp.astype(np.uint16)
    data = encode(Image.fromarray(wide))
    eight = ((wide.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    clipped = np.minimum(wide, 255).astype(np.uint8)
    return data, rgb_png(Image.fromarray(eight)), rgb_png(Image.fromarray(clipped))


def palette_png_with_transparency() -> tuple[bytes, bytes, bytes]:
    index = np.zeros((48, 64), np.uint8)
    index[10:30, 5:40] = 1
    index[:, 50:] = 2  # transparent
    palette = Image.fromarray(index, mode="P")
    palette.putpalette([0, 0, 0, 200, 30, 30, 10, 200, 10] + [0] * (256 * 3 - 9))
    data = encode(palette, transparency=2)
    colours = np.array([[0, 0, 0], [200, 30, 30], [255, 255, 255]], np.uint8)  # transparent -> white
    dropped = np.array([[0, 0, 0], [200, 30, 30], [10, 200, 10]], np.uint8)  # alpha ignored
    return data, rgb_png(Image.fromarray(colours[index])), rgb_png(Image.fromarray(dropped[index]))


def cmyk_jpeg() -> tuple[bytes, bytes, None]:
    source = photo()
    data = encode(source.convert("CMYK"), "JPEG", quality=95)
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    # the CMYK round trip keeps the colours (not inverted, as Adobe-style CMYK misread would be)
    assert np.abs(np.asarray(decoded, np.float64) - np.asarray(source, np.float64)).mean() < 6
    return data, rgb_png(decoded), None


def one_by_one() -> tuple[bytes, bytes, None]:
    return encode(Image.new("RGB", (1, 1), (30, 140, 200))), encode(Image.new("RGB", (3, 3), (30, 140, 200))), None


UNUSUAL = {"EXIF-rotated JPEG": exif_rotated_jpeg, "animated GIF": animated_gif, "16-bit PNG": sixteen_bit_png,
           "palette PNG with transparency": palette_png_with_transparency, "CMYK JPEG": cmyk_jpeg,
           "1x1 PNG": one_by_one}


def embeddings(frontends, *images: bytes) -> list[np.ndarray]:
    response = frontends.stub.Embed(pb.EmbedRequest(images=list(images)), timeout=60)
    return [np.concatenate([np.frombuffer(e.clip.data, "<f4"), np.frombuffer(e.dinov2.data, "<f4")])
            for e in response.embeddings]


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_valid_unusual_images_are_answered_and_decode_to_the_right_pixels(frontends, name):
    data, expected, wrong = UNUSUAL[name]()
    assert len(data) <= LIMITS.max_image_bytes
    assert frontends.stub.Ask(ask_pb(image=data, max_new_tokens=1), timeout=60).chosen_option in ("a", "b")
    status, payload = post(frontends.http_port, json_bytes(chat_body(image=data, options=OPTIONS)),
                           "application/json")
    assert status == 200, payload
    images = [data, expected] + ([wrong] if wrong is not None else [])
    got = embeddings(frontends, *images)
    np.testing.assert_allclose(got[0], got[1], rtol=0, atol=1e-5, err_msg=f"{name}: not the expected pixels")
    if wrong is not None:
        assert not np.allclose(got[0], got[2], atol=1e-3), f"{name}: decoded as the wrong interpretation"


# ---- the docs -------------------------------------------------------------------------------------------


def error_table() -> str:
    """The "Bad input" table of docs/reliability.md, rendered from ``CASES``."""

    def names(fragments: tuple[str, ...]) -> str:
        return " ".join(f"`{f}`" for f in fragments)

    rows = ["| input | what was sent | gRPC status: message contains | HTTP status: `param`; message contains |",
            "|---|---|---|---|"]
    for case in CASES:
        grpc_cell = f"{case.grpc_status}: {names(case.grpc_fragments)}" if case.grpc else "n/a"
        http_cell = "n/a"
        if case.http:
            param = f"`{case.param}`" if case.param else "none"
            http_cell = f"{case.http_status}: {param}; {names(case.http_fragments)}"
        rows.append(f"| {case.name} | {case.what.replace('|', '/')} | {grpc_cell} | {http_cell} |")
    return "\n".join(rows)


def test_docs_error_table_matches_the_battery():
    assert error_table() in DOCS.read_text(), "regenerate: python -c 'from tests.e2e.test_bad_input import " \
                                              "error_table; print(error_table())'"
