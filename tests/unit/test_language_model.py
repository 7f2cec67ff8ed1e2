"""The LM on the tiny profile's LLaVA-format checkpoint (core.language_model), checked against
direct computations with the model's own forward pass (no generate, no KV cache)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mofserve.core.conversation import Option
from mofserve.core.language_model import VisualLanguageModel, llama_config, load_language_model

QUESTION = "Is the elderly person standing or sitting in the picture?"
OPTIONS = "(a) Standing (b) Sitting"


@pytest.fixture(scope="module")
def vlm(tiny_paths) -> VisualLanguageModel:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the served tiny profile runs it (ServingSpec.llm_threads)
    yield VisualLanguageModel.from_checkpoint(tiny_paths.llava, default_max_new_tokens=8)
    torch.set_num_threads(threads)


def visual(n: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))


def full_forward_logprobs(vlm: VisualLanguageModel, embeds: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(vlm.model(inputs_embeds=embeds).logits[0].float(), dim=-1)


def test_visual_tokens_land_at_the_image_placeholder(vlm):
    prompt = vlm.encode_prompt(QUESTION, OPTIONS)
    tokens = visual(256)
    embeds, offset = vlm.inputs_embeds(tokens, prompt)
    before, after = prompt.text.split("<image>")
    assert vlm.tokenizer.decode(prompt.prefix_ids, skip_special_tokens=True) == before
    assert vlm.tokenizer.decode(prompt.suffix_ids) == after
    assert offset == len(prompt.prefix_ids) and embeds.shape == (1, offset + 256 + len(prompt.suffix_ids), 64)
    torch.testing.assert_close(embeds[0, offset:offset + 256], tokens, rtol=0, atol=0)
    table = vlm.model.get_input_embeddings().weight
    torch.testing.assert_close(embeds[0, :offset], table[prompt.prefix_ids], rtol=0, atol=0)
    torch.testing.assert_close(embeds[0, offset + 256:], table[prompt.suffix_ids], rtol=0, atol=0)


def test_greedy_generation_is_deterministic_and_is_the_argmax_of_each_step(vlm):
    tokens = visual(512)
    first = vlm.answer(tokens, QUESTION, max_new_tokens=6)
    assert vlm.answer(tokens, QUESTION, max_new_tokens=6, temperature=0.0) == first
    assert first.generated_tokens == len(first.token_ids) and first.generated_tokens <= 6
    # an independent greedy loop: full forward pass each step, no KV cache
    embeds, _ = vlm.inputs_embeds(tokens, vlm.encode_prompt(QUESTION))
    table = vlm.model.get_input_embeddings().weight
    ids = []
    for _ in range(len(first.token_ids)):
        ids.append(int(full_forward_logprobs(vlm, embeds)[-1].argmax()))
        embeds = torch.cat([embeds, table[ids[-1]][None, None]], dim=1)
    assert ids == first.token_ids
    assert first.text == vlm.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_the_same_seed_samples_the_same_answer_and_leaves_the_global_rng_alone(vlm):
    tokens = visual(256, seed=1)
    state = torch.get_rng_state()
    a = vlm.answer(tokens, QUESTION, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=42)
    b = vlm.answer(tokens, QUESTION, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=42)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert torch.equal(torch.get_rng_state(), state)
    others = {tuple(vlm.answer(tokens, QUESTION, max_new_tokens=12, temperature=1.0, seed=s).token_ids)
              for s in range(4)}
    assert len(others) > 1  # sampling does sample


def independent_option_score(vlm, tokens, option: Option, options: str) -> float:
    """Mean log-probability of " (x) text" after the prompt, from one full forward pass."""
    prompt = vlm.encode_prompt(QUESTION, options)
    embeds, _ = vlm.inputs_embeds(tokens, prompt)
    after = prompt.text.split("<image>")[1]
    whole = vlm.tokenizer(after + " " + option.label, add_special_tokens=False).input_ids
    assert whole[:len(prompt.suffix_ids)] == prompt.suffix_ids
    continuation = whole[len(prompt.suffix_ids):]
    table = vlm.model.get_input_embeddings().weight
    logprobs = full_forward_logprobs(vlm, torch.cat([embeds, table[continuation][None]], dim=1))
    start = embeds.shape[1] - 1
    picked = [float(logprobs[start + j, t]) for j, t in enumerate(continuation)]
    return sum(picked) / len(picked)


@pytest.mark.parametrize("options", [OPTIONS, "(a) Yes (b) No (c) The person is neither standing nor sitting",
                                     '["Left", "Right"]'])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_option_scoring_picks_the_option_with_the_highest_log_likelihood(vlm, options, seed):
    tokens = visual(256, seed=seed)
    answer = vlm.answer(tokens, QUESTION, options, max_new_tokens=2)
    want = [independent_option_score(vlm, tokens, o, options) for o in answer.options]
    assert answer.option_scores == pytest.approx(want, abs=1e-4)
    assert answer.chosen_option == answer.options[max(range(len(want)), key=want.__getitem__)].letter
    assert answer.chosen_option in {o.letter for o in answer.options}
    prompt = vlm.encode_prompt(QUESTION, options)
    embeds, _ = vlm.inputs_embeds(tokens, prompt)  # without a shared prefill: the same scores
    assert vlm.score_options(embeds, prompt, answer.options) == pytest.approx(want, abs=1e-4)


def test_without_options_there_is_no_choice_and_no_score(vlm):
    answer = vlm.answer(visual(), QUESTION)
    assert answer.chosen_option == "" and answer.option_scores == () and isinstance(answer.text, str)


def copy_non_weights(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")):
            shutil.copy2(f, dst / f.name)


def logits_of(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([[5, 17, 42, 99, 3]])).logits


@pytest.mark.parametrize("layout", ["sharded-safetensors", "bin", "sharded-bin"])
def test_sharded_and_bin_llava_checkpoints_load_the_same_language_model(tmp_path, tiny_paths, layout):
    state = load_file(str(tiny_paths.llava / "model.safetensors"))
    # what real LLaVA-1.5 / MoF checkpoints carry besides the LM: skipped quietly
    state["model.vision_tower.vision_tower.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)
    state["model.dino_tower.encoder.weight"] = torch.zeros(2)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    folder = tmp_path / layout
    copy_non_weights(tiny_paths.llava, folder)
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]] if layout.startswith("sharded") else [keys]
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        if layout.endswith("bin"):
            name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin" if len(shards) > 1 else "pytorch_model.bin"
            torch.save({k: state[k] for k in shard}, folder / name)
        else:
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: state[k] for k in shard}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        index = "pytorch_model.bin.index.json" if layout.endswith("bin") else "model.safetensors.index.json"
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    reference, _ = load_language_model(tiny_paths.llava)
    model, tokenizer = load_language_model(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and len(tokenizer) == reference.config.vocab_size
    torch.testing.assert_close(logits_of(model), logits_of(reference), rtol=0, atol=0)


def test_a_checkpoint_without_the_language_model_weights_is_refused(tmp_path, tiny_paths):
    folder = tmp_path / "projectors-only"
    copy_non_weights(tiny_paths.llava, folder)
    state = load_file(str(tiny_paths.llava / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "mm_projector" in k}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"^llava: .* lacks .* language-model weights"):
        load_language_model(folder)


def test_llama_config_comes_from_a_llava_1_5_style_config(tmp_path):
    config = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_size": 64,
              "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
              "num_key_value_heads": 4, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "float16", "vocab_size": 512,
              "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "openai/clip",
              "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "use_mm_proj": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    llama = llama_config(tmp_path)
    assert llama.model_type == "llama" and llama.hidden_size == 64 and llama.max_position_embeddings == 4096
    assert not hasattr(llama, "mm_hidden_size")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, r"^max_new_tokens: must be an integer within \[1, 512\], got 0$"),
    ({"max_new_tokens": 513}, r"^max_new_tokens: must be an integer within \[1, 512\], got 513$"),
    ({"temperature": -0.1}, r"^temperature: must be within \[0, 2\] \(0 = greedy\), got -0.1$"),
    ({"temperature": 2.5}, r"^temperature: must be within \[0, 2\]"),
    ({"temperature": float("nan")}, r"^temperature: must be within \[0, 2\]"),
    ({"top_p": 0.0}, r"^top_p: must be within \(0, 1\], got 0.0$"),
    ({"top_p": 1.5}, r"^top_p: must be within \(0, 1\]"),
    ({"seed": -1}, r"^seed: must be within \[0, 2\^63\), got -1$"),
])
def test_out_of_range_parameters_fail_naming_the_field_and_its_limit(vlm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        vlm.answer(visual(), QUESTION, **kwargs)


def test_defaults_and_limits_are_those_given(vlm):
    assert vlm.sampling().max_new_tokens == 8
    assert vlm.sampling(temperature=2.0, top_p=1.0).temperature == 2.0
    with pytest.raises(ValueError, match=r"^max_new_tokens: default 600 must be within"):
        VisualLanguageModel(vlm.model, vlm.tokenizer, default_max_new_tokens=600)


def test_prompts_that_do_not_fit_the_context_fail_naming_the_field(vlm):
    length = len(vlm.encode_prompt(QUESTION).prefix_ids) + len(vlm.encode_prompt(QUESTION).suffix_ids)
    room = vlm.context_length - length
    with pytest.raises(ValueError, match=r"^question: the prompt is \d+ tokens \(2048 of them visual\)"):
        vlm.answer(visual(2048), QUESTION)
    with pytest.raises(ValueError, match=r"^max_new_tokens: must be at most 10 for this prompt"):
        vlm.answer(visual(room - 10), QUESTION, max_new_tokens=11)


@pytest.mark.parametrize("tokens, message", [
    (torch.zeros(256, 32), r"^visual_tokens: expected \[N, 64\]"),
    (torch.zeros(1, 256, 64), r"^visual_tokens: expected \[N, 64\]"),
    (torch.full((4, 64), float("inf")), "^visual_tokens: expected finite"),
])
def test_visual_tokens_of_the_wrong_shape_or_values_are_refused(vlm, tokens, message):
    with pytest.raises(ValueError, match=message):
        vlm.answer(tokens, QUESTION)


def test_malformed_options_fail_before_any_compute(vlm):
    with pytest.raises(ValueError, match=r"^options: expected MMVP-style"):
        vlm.answer(visual(), QUESTION, "Standing or sitting")
