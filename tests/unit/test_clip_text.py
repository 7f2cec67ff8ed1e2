"""CLIP's text tower: the seeded CLIP tokenizer, the ``clip_text`` export and its parity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, CLIPTextModelWithProjection

from mofserve.core.checkpoints import read_logit_scale
from mofserve.core.runtime import OnnxRunner
from mofserve.core.seeded import build_clip_tokenizer
from mofserve.core.text import CONTEXT_LENGTH, load_clip_tokenizer, tokenize
from mofserve.export import onnx_export
from mofserve.export.configs import CLIP_TEXT_EXPORT, ClipTextEmbeds
from tests.reference import min_row_cosine

SENTENCES = ["a photo of the dog facing left", "a photo of a butterfly with its wings closed.",
             "A Photo of 3 red apples, (and) 1 green one!"]


@pytest.fixture(scope="module")
def tokenizer(tiny_paths):
    return load_clip_tokenizer(tiny_paths.clip)


@pytest.fixture(scope="module")
def text_model(tiny_paths):
    return CLIPTextModelWithProjection.from_pretrained(tiny_paths.clip).eval()  # HF's defaults (sdpa attention)


# ---- the tokenizer ---------------------------------------------------------------------------------------


def test_the_clip_folder_holds_a_clip_tokenizer_with_the_special_tokens_on_top(tiny_paths, tokenizer):
    assert type(tokenizer).__name__ == "CLIPTokenizer"
    assert type(AutoTokenizer.from_pretrained(tiny_paths.clip)).__name__ == "CLIPTokenizer"
    config = json.loads((tiny_paths.clip / "config.json").read_text())["text_config"]
    assert len(tokenizer) <= config["vocab_size"]
    # as in OpenAI's vocabulary: <|startoftext|>, <|endoftext|> are the two highest ids, and the
    # config's legacy eos_token_id 2 makes the text tower pool at argmax(ids)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (len(tokenizer) - 2, len(tokenizer) - 1)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and config["eos_token_id"] == 2


def test_tokenize_pads_to_77_with_end_of_text_and_round_trips(tokenizer):
    ids = tokenize(tokenizer, SENTENCES)
    assert ids.shape == (3, CONTEXT_LENGTH) and ids.dtype == np.int64
    eos = tokenizer.eos_token_id
    for row, sentence in zip(ids, SENTENCES, strict=True):
        assert row[0] == tokenizer.bos_token_id
        end = int(np.argmax(row))  # the first end-of-text: where the text tower pools
        assert row[end] == eos and (row[end:] == eos).all() and eos not in row[1:end]
        decoded = tokenizer.decode(row[1:end].tolist())
        assert decoded.replace(" ", "") == sentence.lower().replace(" ", "")  # CLIP lower-cases
    assert tokenizer.decode(ids[0, 1:int(np.argmax(ids[0]))].tolist()) == SENTENCES[0]


def test_a_long_text_is_truncated_to_the_context_and_still_ends_with_end_of_text(tokenizer):
    ids = tokenize(tokenizer, ["a photo of " + "the dog facing left " * 40])[0]
    assert ids.shape == (77,) and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in ids[:-1]


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40))
def test_no_text_maps_to_the_unknown_token(text):
    """CLIP's unknown token is <|endoftext|>: one inside a text would move the pooled position."""
    tokenizer = _hypothesis_tokenizer()
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in ids[1:-1]


_CACHED: list = []


def _hypothesis_tokenizer():
    if not _CACHED:
        _CACHED.append(build_clip_tokenizer(512))
    return _CACHED[0]


def test_the_tokenizer_build_is_deterministic_and_fits_the_vocabulary():
    a, b = build_clip_tokenizer(512), build_clip_tokenizer(512)
    assert a.get_vocab() == b.get_vocab() and len(a) == 512
    assert len(build_clip_tokenizer(2048)) <= 2048


# ---- the export ------------------------------------------------------------------------------------------


def test_wrapper_is_text_embeds_pooled_at_argmax_of_the_ids(tiny_paths, tokenizer, text_model):
    from mofserve.core.checkpoints import load_clip_text

    wrapper = ClipTextEmbeds(load_clip_text(tiny_paths.clip))
    ids = torch.from_numpy(tokenize(tokenizer, SENTENCES))
    with torch.inference_mode():
        (got,) = wrapper(ids)
        out = text_model(input_ids=ids, attention_mask=(torch.arange(77) <= ids.argmax(-1, keepdim=True)).long(),
                         output_hidden_states=True)
        hidden = text_model.text_model.final_layer_norm(out.hidden_states[-1])
        at_end = hidden[torch.arange(3), ids.argmax(-1)]
        manual = text_model.text_projection(at_end)
    torch.testing.assert_close(got, out.text_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-5)


def test_text_export_matches_pytorch_and_is_cached(tiny_profile, tiny_paths, tokenizer, text_model, tmp_path,
                                                   monkeypatch):
    monkeypatch.setenv("MOFSERVE_HOME", str(tmp_path))
    lines: list[str] = []
    graph = onnx_export.export_vision(CLIP_TEXT_EXPORT, tiny_paths, tiny_profile, log=lines.append)
    assert not graph.cached and graph.folder.name.startswith("clip_text-")
    parity = graph.manifest["parity"]
    assert parity["min_cosine"] >= 0.9999
    assert {c["inputs"] for c in parity["checks"]} == {"random[2]", "padded[3]", "sentences[4]"}
    assert graph.manifest["input"] == "INPUT_IDS" and graph.manifest["outputs"] == ["TEXT_EMBEDS"]
    again = onnx_export.export_vision(CLIP_TEXT_EXPORT, tiny_paths, tiny_profile, log=lines.append)
    assert again.cached and again.folder == graph.folder

    runner = OnnxRunner(graph.graph)
    import onnx

    model = onnx.load(str(graph.graph))
    (inp,) = model.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 77]
    # the graph against HF as people use it (attention mask, sdpa), at batch 1 and 3
    for texts in (SENTENCES[:1], SENTENCES):
        encoded = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
        with torch.inference_mode():
            want = text_model(**encoded).text_embeds.numpy()
        got = runner.run({"INPUT_IDS": encoded["input_ids"].numpy()})["TEXT_EMBEDS"]
        assert got.shape == want.shape and min_row_cosine(got, want) >= 0.9999
        assert float(np.max(np.abs(got - want))) <= 1e-3 * float(np.max(np.abs(want))) + 1e-4
    # causal: what follows the end-of-text token cannot change the embedding; the FIRST maximum pools
    ids = tokenize(tokenizer, SENTENCES[:1])
    noisy = ids.copy()
    end = int(np.argmax(ids[0]))
    noisy[0, end + 1:] = np.random.default_rng(0).integers(0, tokenizer.bos_token_id, 77 - end - 1)
    base, other = (runner.run({"INPUT_IDS": x})["TEXT_EMBEDS"] for x in (ids, noisy))
    np.testing.assert_allclose(base, other, rtol=1e-5, atol=1e-6)


def test_logit_scale_is_read_from_the_weights(tiny_paths):
    # the seeded CLIP keeps CLIPConfig's initial logit_scale (ln(1/0.07)); OpenAI's trained one is ln(100)
    assert math.isclose(read_logit_scale(tiny_paths.clip), 1 / 0.07, rel_tol=1e-4)
