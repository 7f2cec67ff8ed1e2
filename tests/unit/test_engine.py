import pytest

from mofserve.core.tensors import FusionMode
from mofserve.server.engine import EngineError, GenerationParams, Limits, Selection, _covering_wave


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
    with pytest.raises(EngineError, match="alpha: only the additive mode"):
        Selection.parse("clip", 0.5)
    assert Selection.parse("additive", 0.5).alpha == 0.5
    with pytest.raises(EngineError, match=r"alpha: must be within \[0, 1\]"):
        Selection.parse("additive", 1.5)


@pytest.mark.parametrize(("params", "field"), [
    (GenerationParams(max_new_tokens=0), "max_new_tokens"), (GenerationParams(max_new_tokens=10_000), "max_new_tokens"),
    (GenerationParams(temperature=-1), "temperature"), (GenerationParams(temperature=float("nan")), "temperature"),
    (GenerationParams(top_p=0), "top_p"), (GenerationParams(seed=-1), "seed"),
])
def test_generation_params_outside_their_limits_name_the_field(params, field):
    with pytest.raises(EngineError) as error:
        params.validate(Limits())
    assert error.value.code == "invalid_argument" and error.value.message.startswith(f"{field}:")


@pytest.mark.parametrize(("texts", "message"), [
    ([], "texts: give at least one text"),
    (["a photo of a cat", "  "], "texts[1]: empty"),
    (["x" * 2001], "texts[0]: 2001 characters exceeds the limit of 2000 (max_text_chars)"),
    (["a"] * 65, "texts: 65 exceeds the limit of 64 (max_embed_texts)"),
])
def test_embed_text_refuses_bad_texts_before_reaching_triton(texts, message):
    import asyncio

    from mofserve.server.engine import ServingInfo, TritonEngine

    engine = TritonEngine("127.0.0.1:1", ServingInfo("tiny", True))  # nothing listens: validation comes first
    with pytest.raises(EngineError) as error:
        asyncio.run(engine.embed_text(texts))
    assert error.value.code == "invalid_argument" and error.value.message.startswith(message)
