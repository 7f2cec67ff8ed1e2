"""Batching, and chunked prefill fused with the decode steps, change no answer at the paper's LM
width either: a LLaMA of 7B width (hidden 4096, MLP 11008, 32 heads, vocab 32000) with the
paper-shaped profile's LLaMA SentencePiece tokenizer, in fp32. One layer and short visual-token
counts keep it to seconds on 2 CPU cores: the shapes of every matmul and of the attention heads are
the paper's, only the depth and the prompt length are cut (the served paper-shaped profile runs the
full prompt lengths in tests/e2e)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mofserve.core.language_model import VisualLanguageModel
from mofserve.core.llm_engine import LLMEngine
from mofserve.core.profiles import get_profile
from mofserve.core.seeded import write_llava_text_files

QUESTIONS = ("Is the elderly person standing or sitting in the picture?", "Which way is the dog facing?",
             "How many wheels can you see? Count them all.", "Are the butterfly's wings open?")
OPTIONS = ("(a) Standing (b) Sitting", None, "(a) 2 (b) 4 (c) 18", None)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> VisualLanguageModel:
    from transformers import AutoTokenizer, LlamaForCausalLM

    profile = get_profile("paper-shaped")
    spec = profile.seeded
    one_layer = replace(profile, seeded=replace(spec, llm=replace(spec.llm, num_layers=1, dtype="float32")))
    folder = tmp_path_factory.mktemp("paper-width")
    config = write_llava_text_files(one_layer, folder)
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.vocab_size) == \
        (4096, 11008, 32, 32000)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return VisualLanguageModel(model, AutoTokenizer.from_pretrained(folder), default_max_new_tokens=8)


def test_paper_width_batched_greedy_answers_equal_one_at_a_time_in_fp32(vlm):
    generator = torch.Generator().manual_seed(0)
    requests = [dict(visual_tokens=torch.randn((48, 96)[i % 2], 4096, generator=generator) * 0.02,
                     question=QUESTIONS[i % 4], options=OPTIONS[i % 4],
                     sampling=vlm.sampling(max_new_tokens=(3, 8, 5, 6)[i % 4])) for i in range(8)]
    results = {}
    # one at a time; batched; batched with prefills in chunks of 40 fused with the running steps
    for key, slots, chunk in (("alone", 1, 0), ("together", 8, 0), ("chunked", 8, 40)):
        engine = LLMEngine(vlm, max_sequences=slots, prefill_chunk=chunk)
        try:
            results[key] = engine.generate_many(requests, timeout=600)
            stats = engine.stats()
        finally:
            engine.close()
        if slots == 8:
            assert stats["batched_rows"] > stats["steps"]  # sequences shared decode steps
        if chunk:
            assert stats["fused_chunks"] > 0
    for alone, together, chunked in zip(results["alone"], results["together"], results["chunked"], strict=True):
        assert alone.token_ids == together.token_ids == chunked.token_ids and alone.answer == together.answer
        assert alone.chosen_option == together.chosen_option == chunked.chosen_option
        assert alone.option_scores == together.option_scores
        torch.testing.assert_close(torch.tensor(chunked.option_scores), torch.tensor(alone.option_scores),
                                   rtol=0, atol=1e-4)
        assert alone.prompt_tokens == together.prompt_tokens == chunked.prompt_tokens
