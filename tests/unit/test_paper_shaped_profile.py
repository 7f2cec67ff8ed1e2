"""The paper-shaped profile: the paper's shapes, a configurable LM depth that never collides, and the
seeded-checkpoint pieces it needs (LLaMA tokenizer files, sharded safetensors). Nothing is built at
full size here (the e2e test does): these checks run in about a second."""

from __future__ import annotations

import json

import pytest
import torch

from mofserve.core import seeded
from mofserve.core.checkpoints import iter_tensors
from mofserve.core.profiles import PAPER_SHAPED_LLM_LAYERS_ENV, PROFILE_NAMES, get_profile


def test_paper_shaped_has_the_papers_shapes(monkeypatch):
    monkeypatch.delenv(PAPER_SHAPED_LLM_LAYERS_ENV, raising=False)
    profile = get_profile("paper-shaped")
    spec = profile.seeded
    assert "paper-shaped" in PROFILE_NAMES and profile.random_weights
    assert (profile.image_size, profile.patch_size, profile.num_patches) == (336, 14, 576)
    assert (spec.clip.hidden_size, spec.clip.num_layers, spec.clip.num_heads, spec.clip.intermediate_size,
            spec.clip.native_image_size, spec.clip.projection_dim) == (1024, 24, 16, 4096, 336, 768)
    assert (spec.dino.hidden_size, spec.dino.num_layers, spec.dino.num_heads, spec.dino.intermediate_size,
            spec.dino.native_image_size) == (1024, 24, 16, 4096, 518)
    llm = spec.llm
    assert (llm.hidden_size, llm.num_layers, llm.num_heads, llm.num_kv_heads, llm.intermediate_size,
            llm.vocab_size, llm.max_position_embeddings, llm.rms_norm_eps) == (4096, 2, 32, 32, 11008, 32000,
                                                                               4096, 1e-5)
    serving = profile.serving
    assert (serving.llm_dtype, serving.runtime, serving.max_new_tokens) == ("bfloat16", "openvino", 32)


def test_llm_depth_comes_from_the_environment_and_moves_the_checkpoints(monkeypatch):
    monkeypatch.delenv(PAPER_SHAPED_LLM_LAYERS_ENV, raising=False)
    default = get_profile("paper-shaped")
    monkeypatch.setenv(PAPER_SHAPED_LLM_LAYERS_ENV, "32")
    deep = get_profile("paper-shaped")
    assert deep.seeded.llm.num_layers == 32
    assert deep.sources.llava != default.sources.llava and deep.sources.clip != default.sources.clip
    assert seeded._spec_digest(deep) != seeded._spec_digest(default)
    for bad in ("0", "33", "two", "-1"):
        monkeypatch.setenv(PAPER_SHAPED_LLM_LAYERS_ENV, bad)
        with pytest.raises(ValueError, match=PAPER_SHAPED_LLM_LAYERS_ENV):
            get_profile("paper-shaped")


def test_fields_added_later_leave_tiny_and_small_digests_alone():
    """tiny's and small's folders (and the ONNX exports cached from them) must not be rebuilt."""
    for name in ("tiny", "small"):
        payload = seeded._spec_payload(get_profile(name).seeded)
        assert "clip_text" not in payload and "tokenizer" not in payload
        assert "dtype" not in payload["llm"] and "rms_norm_eps" not in payload["llm"]


def test_llama_tokenizer_files_are_llava_15s(tmp_path):
    assert seeded.LLAMA_TOKENIZER_MODEL.stat().st_size < 1024**2
    seeded.write_llama_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["legacy"] is True
    assert (config["add_bos_token"], config["add_eos_token"], config["pad_token"]) == (True, False, "<unk>")
    assert [config[k]["content"] for k in ("bos_token", "eos_token", "unk_token")] == ["<s>", "</s>", "<unk>"]
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert special["pad_token"] == "<unk>" and special["bos_token"]["content"] == "<s>"
    assert (tmp_path / "tokenizer.model").read_bytes() == seeded.LLAMA_TOKENIZER_MODEL.read_bytes()


def test_drawn_llama_state_is_seeded_and_in_the_requested_dtype():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=100, tie_word_embeddings=False)
    a = seeded._drawn_llama_state(config, torch.bfloat16, seed=0)
    b = seeded._drawn_llama_state(config, torch.bfloat16, seed=0)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == torch.bfloat16 for k in a)
    assert torch.equal(a["model.norm.weight"], torch.ones(32, dtype=torch.bfloat16))
    assert 0.015 < float(a["model.layers.0.mlp.up_proj.weight"].float().std()) < 0.025


def test_large_states_are_written_as_indexed_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(seeded, "_SHARD_BYTES", 600)  # one 512-byte tensor a shard
    state = {f"model.layers.{i}.weight": torch.full((16, 16), float(i), dtype=torch.bfloat16) for i in range(5)}
    seeded._save_sharded(state, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    read = dict(iter_tensors(tmp_path, ("model.",)))
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
