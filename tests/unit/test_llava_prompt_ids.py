"""The ids the server feeds the LM are LLaVA-1.5's, token for token.

LLaVA builds them with ``tokenizer_image_token`` (haotian-liu/LLaVA, ``llava/mm_utils.py``) and the
slow SentencePiece ``LlamaTokenizer`` (``llava/model/builder.py`` loads LLaVA checkpoints with
``use_fast=False``). The server builds them with ``VisualLanguageModel.encode_prompt``: ``prefix_ids +
[IMAGE] + suffix_ids`` from the tokenizer transformers 5 loads from the checkpoint folder. These tests
hold the two equal on MMVP questions with the ``paper-shaped`` profile's LLaMA SentencePiece model
(only its tokenizer files and ``config.json`` are written: no weights), so a real LLaVA-1.5 or I-MoF
checkpoint gets the prompt it was trained on, whatever transformers 5 changed in its tokenizers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from mofserve.core.conversation import ROLES, SEP, SYSTEM, build_prompt
from mofserve.core.language_model import VisualLanguageModel
from mofserve.core.profiles import get_profile
from mofserve.core.seeded import write_llava_text_files

IMAGE_TOKEN_INDEX = -200  # llava/constants.py

# Two real MMVP rows (Questions.csv rows 1 and 279), then MMVP-style questions written for this test:
# digits, times, money, quotes, dashes, non-ASCII, an emoji, newlines and a JSON option list.
QUESTIONS = [
    ("Are the butterfly's wings closer to being open or closed?", "(a) Open (b) Closed"),
    ("Is the elderly person standing or sitting in the picture?", "(a) Standing (b) Sitting"),
    ("Is the dog facing left or right from the camera's perspective?", "(a) Left (b) Right"),
    ("How many eyes can you see in the image?", "(a) One (b) Two"),
    ("How many wheels does the 18-wheeler show: 4, 6 or 18?", "(a) 4 (b) 6 (c) 18"),
    ("Is the clock showing 10:10 or 3:45?", "(a) 10:10 (b) 3:45"),
    ("Does the café's menu list crème brûlée for €4.50?", "(a) Yes (b) No"),
    ("Where is the snowman — on the left or the right of the tree?", "(a) Left (b) Right"),
    ("Does the sign say 「止まれ」 or STOP?", "(a) 止まれ (b) STOP"),
    ("Is there a 🐱 or a 🐶 in the top-left corner?", "(a) Cat (b) Dog"),
    ("Is the thermometer above 0°C (32°F)?", "(a) Above (b) Below"),
    ('Is the text on the T-shirt "NASA" or "N.A.S.A."?', '["NASA", "N.A.S.A."]'),
    ("Is the door of the truck open or closed?\nLook at the handle.", "(a) Open\n(b) Closed"),
]
CASES = [(q, o) for q, o in QUESTIONS] + [(q, None) for q, _ in QUESTIONS]


def llava_tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """LLaVA's ``tokenizer_image_token`` (haotian-liu/LLaVA, llava/mm_utils.py), same logic: each chunk
    between ``<image>`` markers is tokenised on its own (the tokenizer adds BOS to each), chunks are
    joined by ``[image_token_index] * (offset + 1)``, and when the first chunk starts with BOS it is
    kept once and ``offset`` (1) elements are dropped from the front of every chunk and separator."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    offset = 0
    ids: list[int] = []
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    separator = [image_token_index] * (offset + 1)
    interleaved = [part for chunk in chunks for part in (chunk, separator)][:-1]
    for part in interleaved:
        ids.extend(part[offset:])
    return ids


class SlowLlamaTokenizer:
    """What LLaVA tokenises with: transformers 4's slow ``LlamaTokenizer`` (legacy), i.e. BOS then
    SentencePiece's own encoding of the text (valid for text holding no special-token strings)."""

    bos_token_id = 1

    def __init__(self, model_file: Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def __call__(self, text: str) -> SimpleNamespace:
        assert not any(s in text for s in ("<s>", "</s>", "<unk>")), "the slow tokenizer splits these off"
        return SimpleNamespace(input_ids=[self.bos_token_id, *self.sp.encode(text)])


def _llava_v1_prompt(question: str, options: str | None) -> str:
    """LLaVA's conv_llava_v1 (SeparatorStyle.TWO) for one user turn, as MMVP's script fills it."""
    from mofserve.core.conversation import options_text

    message = "<image>\n" + question + (" " + options_text(options) if options else "")
    return SYSTEM + SEP + ROLES[0] + ": " + message + SEP + ROLES[1] + ":"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The paper-shaped LLaVA folder's text files (as served: config.json says ``model_type: llava``),
    the same with ``legacy: false`` (in case a checkpoint says so) and the bare tokenizer files."""
    root = tmp_path_factory.mktemp("llama_sp")
    served = root / "llava"
    write_llava_text_files(get_profile("paper-shaped"), served)
    not_legacy = root / "not-legacy"
    shutil.copytree(served, not_legacy)
    config = json.loads((not_legacy / "tokenizer_config.json").read_text())
    (not_legacy / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    bare = root / "bare"
    shutil.copytree(served, bare)
    (bare / "config.json").unlink()
    return {"served": served, "not-legacy": not_legacy, "bare": bare}


def _vlm(folder: Path) -> VisualLanguageModel:
    """A VisualLanguageModel with the folder's tokenizer, loaded as ``load_language_model`` loads it, and
    a 16-wide stand-in LLaMA (``encode_prompt`` reads only the tokenizer)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096)
    return VisualLanguageModel(LlamaForCausalLM(config), tokenizer)


@pytest.fixture(scope="module")
def vlms(folders) -> dict[str, VisualLanguageModel]:
    return {name: _vlm(folder) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def slow(folders) -> SlowLlamaTokenizer:
    return SlowLlamaTokenizer(folders["served"] / "tokenizer.model")


@pytest.mark.parametrize(("question", "options"), CASES)
def test_served_ids_equal_llava_tokenizer_image_token(vlms, slow, question, options):
    prompt = build_prompt(question, options)
    assert prompt == _llava_v1_prompt(question, options)
    expected = llava_tokenizer_image_token(prompt, slow)
    assert expected.count(IMAGE_TOKEN_INDEX) == 1 and expected[0] == 1
    for name, vlm in vlms.items():
        encoded = vlm.encode_prompt(question, options)
        assert encoded.text == prompt
        served = [*encoded.prefix_ids, IMAGE_TOKEN_INDEX, *encoded.suffix_ids]
        assert served == expected, name
        # LLaVA's function over transformers 5's own tokenizer gives the same ids too
        assert llava_tokenizer_image_token(prompt, vlm.tokenizer) == expected, name


def test_newline_after_image_is_a_dummy_prefix_then_a_byte(vlms, slow):
    """LLaMA tokenises the chunk after ``<image>`` with its dummy prefix: ``\\n`` -> ["▁", "<0x0A>"]
    (29871, 13 in LLaMA's vocabulary), the pair every LLaVA-1.5 prompt has after its visual tokens."""
    tokenizer = vlms["served"].tokenizer
    suffix = vlms["served"].encode_prompt(*QUESTIONS[1]).suffix_ids
    assert tokenizer.convert_ids_to_tokens(suffix[:2]) == ["▁", "<0x0A>"]
    assert suffix[:2] == slow.sp.encode("\n")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == 0  # LLaVA sets pad = unk
    assert len(tokenizer) == slow.sp.get_piece_size() == 32000


@pytest.mark.parametrize("text", [
    " ASSISTANT: (a) Open", "  two leading spaces", "\n\nnew lines", "tabs\tand  double  spaces ",
    "(a) 10:10 (b) 3:45", "crème brûlée €4.50 止まれ 🐱", " (b) Sitting", "",
])
def test_llava_folder_tokenizer_is_sentencepiece_exact(vlms, slow, text):
    """Beyond the prompt: option continuations and free text encode as SentencePiece does. transformers
    5 builds a LLaVA folder's tokenizer (``model_type: llava``) from the SentencePiece proto; with
    ``legacy: true`` it keeps the dummy prefix before a leading space too."""
    assert vlms["served"].tokenizer(text).input_ids == slow(text).input_ids
