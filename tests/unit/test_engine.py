import asyncio

import pytest

from mofserve.core.profiles import get_profile
from mofserve.core.tensors import FusionMode
from mofserve.server.engine import (
    ERROR_CODES,
    EngineError,
    GenerationParams,
    Limits,
    Question,
    Selection,
    ServingInfo,
    TritonEngine,
    _covering_wave,
)
from mofserve.server.grpc_service import GRPC_STATUS

ENGINE = TritonEngine("127.0.0.1:1", ServingInfo("tiny", True))  # nothing listens: validation comes first


def sel(*modes: str) -> list[Selection]:
    return [Selection(FusionMode(m)) for m in modes]


@pytest.mark.parametrize(("modes", "wave"), [
    (("clip", "interleaved", "dinov2"), [1]),  # interleaved uses both encoders: it goes first, alone
    (("additive", "clip"), [0]),
    (("clip", "dinov2"), [0, 1]),  # no mode uses both: one per encoder, side by side
    (("dinov2", "clip", "clip"), [1, 0]),
    (("clip", "clip"), [0]),
])
def test_compare_runs_each_needed_encoder_once_in_its_first_wave(modes, wave):
    assert sorted(_covering_wave(sel(*modes))) == sorted(wave)


def test_alpha_is_refused_for_modes_that_do_not_mix():
    with pytest.raises(EngineError, match="alpha: only the additive mode") as error:
        Selection.parse("clip", 0.5)
    assert error.value.field == "alpha"
    assert Selection.parse("additive", 0.5).alpha == 0.5
    with pytest.raises(EngineError, match=r"alpha: must be within \[0, 1\]") as error:
        Selection.parse("additive", 1.5)
    assert error.value.field == "alpha"
    with pytest.raises(EngineError, match="mode: unknown fusion mode") as error:
        Selection.parse("bogus")
    assert (error.value.code, error.value.field) == ("invalid_argument", "mode")


def test_the_effective_alpha_is_decided_once_by_the_engine():
    default = get_profile("tiny").default_alpha
    assert ENGINE.effective_alpha(Selection.parse("additive")) == default is not None
    assert ENGINE.effective_alpha(Selection.parse("additive", 0.25)) == 0.25
    assert ENGINE.effective_alpha(Selection.parse("additive", 0.0)) == 0.0
    assert ENGINE.effective_alpha(Selection.parse("interleaved")) is None


def test_every_engine_code_has_a_grpc_status():
    assert set(GRPC_STATUS) == ERROR_CODES


@pytest.mark.parametrize(("question", "field", "code"), [
    (Question(b"", "Which way?"), "image", "invalid_argument"),
    (Question(b"x" * (Limits().max_image_bytes + 1), "Which way?"), "image", "too_large"),
    (Question(b"png", "  "), "question", "invalid_argument"),
    (Question(b"png", "which \ud800 way?"), "question", "invalid_argument"),
    (Question(b"png", "Which way?", "(a) Left"), "options", "invalid_argument"),
    (Question(b"png", "Which way?", "x" * 2001), "options", "invalid_argument"),
    (Question(b"png", "Which way?", generation=GenerationParams(top_p=0)), "top_p", "invalid_argument"),
])
def test_question_refusals_carry_their_field_as_data(question, field, code):
    with pytest.raises(EngineError) as error:
        ENGINE._check_question(question)
    assert (error.value.code, error.value.field) == (code, field)
    assert error.value.message.startswith(f"{field}: ")  # for humans; nothing reads it back


@pytest.mark.parametrize(("params", "field"), [
    (GenerationParams(max_new_tokens=0), "max_new_tokens"), (GenerationParams(max_new_tokens=10_000), "max_new_tokens"),
    (GenerationParams(temperature=-1), "temperature"), (GenerationParams(temperature=float("nan")), "temperature"),
    (GenerationParams(top_p=0), "top_p"), (GenerationParams(seed=-1), "seed"),
])
def test_generation_params_outside_their_limits_name_the_field(params, field):
    with pytest.raises(EngineError) as error:
        params.validate(Limits())
    assert (error.value.code, error.value.field) == ("invalid_argument", field)
    assert error.value.message.startswith(f"{field}:")


@pytest.mark.parametrize(("texts", "field", "message"), [
    ([], "texts", "texts: give at least one text"),
    (["a photo of a cat", "  "], "texts[1]", "texts[1]: empty"),
    (["x" * 2001], "texts[0]", "texts[0]: 2001 characters exceeds the limit of 2000 (max_text_chars)"),
    (["a"] * 65, "texts", "texts: 65 exceeds the limit of 64 (max_embed_texts)"),
])
def test_embed_text_refuses_bad_texts_before_reaching_triton(texts, field, message):
    with pytest.raises(EngineError) as error:
        asyncio.run(ENGINE.embed_text(texts))
    assert (error.value.code, error.value.field) == ("invalid_argument", field)
    assert error.value.message.startswith(message)


@pytest.mark.parametrize(("images", "field", "code"), [
    ([], "images", "invalid_argument"),
    ([b"png", b""], "images[1]", "invalid_argument"),
    ([b"x" * (Limits().max_image_bytes + 1)], "images[0]", "too_large"),
])
def test_embed_refuses_bad_images_naming_the_field(images, field, code):
    with pytest.raises(EngineError) as error:
        asyncio.run(ENGINE.embed(images))
    assert (error.value.code, error.value.field) == (code, field)


def test_compare_refuses_no_modes_naming_the_field():
    with pytest.raises(EngineError) as error:
        asyncio.run(ENGINE.compare(Question(b"png", "Which way?"), []))
    assert error.value.field == "modes"
