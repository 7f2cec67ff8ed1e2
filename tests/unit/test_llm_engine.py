"""In-flight batching (core.llm_engine) on the tiny profile's LM, in fp32: batching changes no
answer, sequences join and leave the running batch, bounds refuse instead of running out of
memory, cancellation frees a slot, seeded sampling does not depend on neighbours."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from mofserve.core.language_model import VisualLanguageModel
from mofserve.core.llm_engine import CapacityError, Delta, Finished, LLMEngine

QUESTIONS = ("Is the elderly person standing or sitting in the picture?",
             "Which direction is the school bus facing?",
             "How many eyes can you see on the animal in the picture? Count carefully, then answer in one word.",
             "Are the butterfly's wings open?")
OPTIONS = ("(a) Standing (b) Sitting", None, "(a) One (b) Two (c) Three", None)


@pytest.fixture(scope="module")
def vlm(tiny_paths) -> VisualLanguageModel:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the served tiny profile runs it
    yield VisualLanguageModel.from_checkpoint(tiny_paths.llava, default_max_new_tokens=16)
    torch.set_num_threads(threads)


def visual(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))


def mixed_requests(vlm: VisualLanguageModel, count: int = 8, **sampling) -> list[dict]:
    """Different images, token counts (A-MoF-like 256, I-MoF-like 512), prompt lengths, options and limits."""
    return [dict(visual_tokens=visual((256, 512)[i % 2], seed=i), question=QUESTIONS[i % 4], options=OPTIONS[i % 4],
                 sampling=vlm.sampling(max_new_tokens=(3, 16, 9, 12)[i % 4], **sampling)) for i in range(count)]


def run(vlm: VisualLanguageModel, requests: list[dict], max_sequences: int) -> tuple[list[Finished], dict]:
    engine = LLMEngine(vlm, max_sequences=max_sequences)
    try:
        return engine.generate_many(requests, timeout=120), engine.stats()
    finally:
        engine.close()


def test_batched_greedy_answers_equal_one_at_a_time_answers_token_for_token(vlm):
    requests = mixed_requests(vlm)
    alone, alone_stats = run(vlm, requests, max_sequences=1)
    together, together_stats = run(vlm, requests, max_sequences=8)
    assert alone_stats["batched_rows"] == alone_stats["steps"]  # one sequence per step
    assert together_stats["batched_rows"] > 2 * together_stats["steps"]  # they shared steps
    for a, b in zip(alone, together, strict=True):
        assert a.token_ids == b.token_ids and a.answer == b.answer and a.finish_reason == b.finish_reason
        assert a.chosen_option == b.chosen_option and a.option_scores == b.option_scores
        assert a.prompt_tokens == b.prompt_tokens and a.completion_tokens == b.completion_tokens


def test_engine_tokens_equal_transformers_generate_and_its_option_scores(vlm):
    """The engine's decode step (its own attention over the slots) against HF ``generate``."""
    for request in mixed_requests(vlm, count=4):
        reference = vlm.answer(request["visual_tokens"], request["question"], request["options"],
                               max_new_tokens=request["sampling"].max_new_tokens)
        result, _ = run(vlm, [request], max_sequences=4)
        ids = [t for t in result[0].token_ids if t != vlm.model.generation_config.eos_token_id]
        assert ids == reference.token_ids and result[0].answer == reference.text
        assert result[0].chosen_option == reference.chosen_option
        torch.testing.assert_close(torch.tensor(result[0].option_scores), torch.tensor(reference.option_scores),
                                   rtol=0, atol=1e-5)


def test_usage_counts_what_the_model_read_and_wrote(vlm):
    request = mixed_requests(vlm, count=2)[1]
    (result,), _ = run(vlm, [request], max_sequences=2)
    prompt = vlm.encode_prompt(request["question"], request["options"])
    assert result.prompt_tokens == len(prompt.prefix_ids) + 512 + len(prompt.suffix_ids)
    assert result.completion_tokens == len(result.token_ids) <= request["sampling"].max_new_tokens
    assert result.finish_reason == ("stop" if result.token_ids[-1] == vlm.model.generation_config.eos_token_id
                                    else "length")


def test_deltas_stream_every_token_and_add_up_to_the_answer(vlm):
    events: list = []
    engine = LLMEngine(vlm, max_sequences=4)
    try:
        results = engine.generate_many(mixed_requests(vlm, count=4), on_event=events.append, timeout=120)
    finally:
        engine.close()
    for result in results:
        deltas = [e for e in events if isinstance(e, Delta) and e.request_id == result.request_id]
        assert len(deltas) == result.completion_tokens and deltas[0].first
        assert [d.completion_tokens for d in deltas] == list(range(1, len(deltas) + 1))
        assert "".join(d.text for d in deltas) == result.answer
        assert deltas[0].chosen_option == result.chosen_option


def test_seeded_sampling_is_reproducible_whoever_shares_the_steps(vlm):
    sampled = mixed_requests(vlm, count=4, temperature=0.9, top_p=0.8, seed=1234)
    alone, _ = run(vlm, [sampled[1]], max_sequences=1)
    with_neighbours, _ = run(vlm, [*mixed_requests(vlm, count=3), sampled[1]], max_sequences=4)
    assert alone[0].token_ids == with_neighbours[-1].token_ids
    other_seed = dict(sampled[1], sampling=vlm.sampling(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=99))
    assert run(vlm, [other_seed], max_sequences=1)[0][0].token_ids != alone[0].token_ids


def test_a_request_that_cannot_fit_a_slot_is_refused_up_front(vlm):
    # 64-wide, 2 layers, 2 KV heads of 16, fp32: 512 bytes a token; 1 MiB over 8 slots = 256 tokens each
    engine = LLMEngine(vlm, max_sequences=8, kv_cache_mb=1)
    try:
        assert engine.geometry.slot_tokens == 256
        with pytest.raises(CapacityError, match=r"max_new_tokens: .* a sequence slot holds 256") as refused:
            engine.submit("big", visual(512, 0), QUESTIONS[0], None, vlm.sampling(max_new_tokens=4), emit=print)
        assert refused.value.field == "max_new_tokens"  # data, for ERROR_FIELD
        with pytest.raises(ValueError) as bad:
            vlm.sampling(max_new_tokens=10_000)
        assert bad.value.field == "max_new_tokens"
        result = engine.answer(visual(128, 0), QUESTIONS[1], max_new_tokens=4)
        assert result.completion_tokens >= 1
    finally:
        engine.close()


def test_a_full_queue_refuses_and_max_sequences_bounds_the_batch(vlm):
    engine = LLMEngine(vlm, max_sequences=2, max_waiting=3)
    gate, seen = threading.Event(), []

    def slow(event) -> None:  # the first delta waits: the loop is held while we fill the queue
        gate.wait(30)
        seen.append(event)

    try:
        engine.submit("held", visual(64, 0), QUESTIONS[0], None, vlm.sampling(max_new_tokens=2), emit=slow)
        deadline = time.monotonic() + 30  # the loop takes it (then holds in `slow`): the queue is ours
        while engine.stats()["waiting"] and time.monotonic() < deadline:
            time.sleep(0.005)
        for i in range(3):
            engine.submit(f"q{i}", visual(64, i), QUESTIONS[1], None, vlm.sampling(max_new_tokens=2), emit=slow)
        with pytest.raises(CapacityError, match="waiting for a slot"):
            engine.submit("over", visual(64, 9), QUESTIONS[1], None, vlm.sampling(max_new_tokens=2), emit=slow)
        gate.set()
    finally:
        gate.set()
        engine.close()
    assert engine.stats()["batched_rows"] <= 2 * engine.stats()["steps"]


def test_cancel_ends_a_running_sequence_and_frees_its_slot(vlm):
    engine = LLMEngine(vlm, max_sequences=1)
    events: dict[str, list] = {"long": [], "next": []}
    finished = threading.Event()

    def on(name):
        def emit(event):
            events[name].append(event)
            if name == "long" and isinstance(event, Delta) and event.completion_tokens == 2:
                engine.cancel("long")
            if isinstance(event, Finished) and name == "next":
                finished.set()
        return emit

    try:
        # a token limit far beyond what it gets to: only the cancel ends it
        engine.submit("long", visual(64, 1), QUESTIONS[0], None, vlm.sampling(max_new_tokens=500), emit=on("long"))
        engine.submit("next", visual(64, 2), QUESTIONS[1], None, vlm.sampling(max_new_tokens=3), emit=on("next"))
        assert finished.wait(60)
    finally:
        engine.close()
    last = events["long"][-1]
    assert isinstance(last, Finished) and last.finish_reason == "cancelled" and last.completion_tokens < 10
    assert not engine.cancel("long")  # gone: nothing to cancel


def test_a_failing_callback_cancels_only_its_own_sequence(vlm):
    engine = LLMEngine(vlm, max_sequences=4)

    def broken(event) -> None:
        raise ConnectionError("stream gone")

    try:
        engine.submit("broken", visual(64, 3), QUESTIONS[2], None, vlm.sampling(max_new_tokens=50), emit=broken)
        result = engine.answer(visual(64, 4), QUESTIONS[3], max_new_tokens=5)
        assert result.finish_reason in ("stop", "length")
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_answers_equal_one_at_a_time_on_cuda(tiny_paths):
    cuda = VisualLanguageModel.from_checkpoint(tiny_paths.llava, device="cuda", default_max_new_tokens=16)
    requests = mixed_requests(cuda)
    alone, _ = run(cuda, requests, max_sequences=1)
    together, _ = run(cuda, requests, max_sequences=8)
    assert [a.token_ids for a in alone] == [b.token_ids for b in together]


def test_a_cancel_that_arrives_before_its_request_ends_it_without_a_prefill(vlm):
    """The front-end may give up while the request is still in the encoders: the cancel for its id
    comes first, and the late request must not take a slot."""
    engine = LLMEngine(vlm, max_sequences=1)
    try:
        assert not engine.cancel("early")
        (result,) = engine.generate_many([dict(request_id="early", visual_tokens=visual(64, 5), question=QUESTIONS[0],
                                               options=None, sampling=vlm.sampling(max_new_tokens=8))], timeout=30)
        assert result.finish_reason == "cancelled" and result.completion_tokens == 0
        assert engine.answer(visual(64, 6), QUESTIONS[1], max_new_tokens=2).finish_reason == "length"
    finally:
        engine.close()


def test_a_chunked_prefill_gives_the_tokens_and_option_scores_of_a_whole_prompt_prefill(vlm):
    requests = mixed_requests(vlm)
    engines = {chunk: LLMEngine(vlm, max_sequences=8, prefill_chunk=chunk) for chunk in (0, 37)}
    try:
        whole, chunked = (engines[c].generate_many(requests, timeout=120) for c in (0, 37))
        assert engines[0].stats()["prefill_chunks"] == len(requests)
        chunks = sum(-(-r.prompt_tokens // 37) for r in whole)  # ceil per prompt
        stats = engines[37].stats()
        assert 3 * len(requests) < stats["prefill_chunks"] < chunks  # the first prompt, alone, in one piece
        assert stats["fused_chunks"] > len(requests)  # later joiners' chunks rode the steps
    finally:
        for engine in engines.values():
            engine.close()
    for a, b in zip(whole, chunked, strict=True):
        assert a.token_ids == b.token_ids and a.chosen_option == b.chosen_option and a.prompt_tokens == b.prompt_tokens
        torch.testing.assert_close(torch.tensor(a.option_scores), torch.tensor(b.option_scores), rtol=0, atol=1e-5)


def _tokens_while_joining(vlm, prefill_chunk: int) -> tuple[int, int]:
    """A long answer runs; a second request joins. How many tokens the first got between the
    second being queued and its first token, and the second's prompt length."""
    engine = LLMEngine(vlm, max_sequences=2, prefill_chunk=prefill_chunk)
    counts = {"running": 0, "at_submit": -1, "at_join": -1}
    started, joined = threading.Event(), threading.Event()

    def running(event):
        if isinstance(event, Delta):
            counts["running"] += 1
            started.set()

    def joining(event):
        if isinstance(event, Delta) and event.first:
            counts["at_join"] = counts["running"]
            joined.set()

    try:
        engine.submit("running", visual(64, 7), QUESTIONS[0], None, vlm.sampling(max_new_tokens=500), emit=running)
        assert started.wait(60)
        request = dict(visual_tokens=visual(256, 8), question=QUESTIONS[2], options=OPTIONS[2])
        engine.submit("joining", sampling=vlm.sampling(max_new_tokens=2), emit=joining, **request)
        counts["at_submit"] = counts["running"]  # after: submit's own prompt preparation lets tokens through
        assert joined.wait(60)
        prompt = engine.vlm.prepare(request["visual_tokens"], request["question"], request["options"],
                                    vlm.sampling(max_new_tokens=2))[1].shape[1]
    finally:
        engine.close()
    return counts["at_join"] - counts["at_submit"], prompt


def test_running_streams_get_tokens_between_the_chunks_of_a_joining_prefill(vlm):
    whole, _ = _tokens_while_joining(vlm, prefill_chunk=0)
    chunked, prompt = _tokens_while_joining(vlm, prefill_chunk=32)
    chunks = -(-prompt // 32)
    assert whole <= 1  # at most the step under way when it arrived: the prefill stalls the stream
    # a decode step between each two chunks (a few may run before submit returns to this thread)
    assert chunked >= chunks // 2 >= 4


def test_a_request_cancelled_during_its_chunked_prefill_ends_without_a_token_and_frees_its_slot(vlm):
    engine = LLMEngine(vlm, max_sequences=2, prefill_chunk=8)
    events: list = []

    def running(event):  # runs on the loop thread between the joiner's chunks
        if engine.stats()["prefilling"] and engine.cancel("joining"):
            engine.cancel("running")

    try:
        engine.submit("running", visual(64, 9), QUESTIONS[1], None, vlm.sampling(max_new_tokens=500), emit=running)
        (result,) = engine.generate_many([dict(request_id="joining", visual_tokens=visual(256, 10),
                                               question=QUESTIONS[0], options=OPTIONS[0],
                                               sampling=vlm.sampling(max_new_tokens=4))],
                                         on_event=events.append, timeout=60)
        assert result.finish_reason == "cancelled" and result.completion_tokens == 0 and result.token_ids == ()
        assert not any(isinstance(e, Delta) for e in events)
        assert engine.stats()["prefill_chunks"] < 256 // 8  # stopped part-way
        assert engine.answer(visual(64, 11), QUESTIONS[3], max_new_tokens=2).finish_reason == "length"
        assert engine.stats()["running"] == 0 and engine.stats()["prefilling"] == 0
    finally:
        engine.close()


def test_a_prompt_is_prefilled_in_one_forward_when_nobody_is_decoding(vlm):
    engine = LLMEngine(vlm, max_sequences=2, prefill_chunk=8)
    try:
        result = engine.answer(visual(256, 12), QUESTIONS[0], OPTIONS[0], max_new_tokens=2)
        assert result.prompt_tokens > 8 * 30 and engine.stats()["prefill_chunks"] == 1
    finally:
        engine.close()


def test_prefill_chunk_must_not_be_negative(vlm):
    with pytest.raises(ValueError, match="prefill_chunk"):
        LLMEngine(vlm, prefill_chunk=-1)


def test_a_fused_step_gives_a_decode_steps_logits_and_the_models_own_logits_for_the_chunk(vlm):
    """kv_slots.mixed_step: the running rows as decode_step gives them, the chunk as the model's own
    forward continuing the joiner's cache gives it (fp32; only GEMM shapes differ)."""
    import copy

    from mofserve.core.kv_slots import SlotCache, decode_step, geometry, mixed_step

    model = vlm.model
    slots = SlotCache(geometry(model, 3, 0), "cpu")
    prompts = [vlm.prepare(visual(n, seed=20 + n), QUESTIONS[1], None, vlm.sampling())[1] for n in (40, 70)]
    with torch.inference_mode():
        for slot, embeds in enumerate(prompts):
            slots.load(slot, model(inputs_embeds=embeds[:, :-1], use_cache=True).past_key_values)
        lengths = torch.tensor([p.shape[1] - 1 for p in prompts])
        last = torch.stack([p[0, -1] for p in prompts])[:, None]
        joiner = vlm.prepare(visual(90, seed=30), QUESTIONS[2], OPTIONS[2], vlm.sampling())[1]
        kv = model(inputs_embeds=joiner[:, :50], use_cache=True).past_key_values
        reference_chunk = model(inputs_embeds=joiner[:, 50:83], **{vlm.cache_arg: copy.deepcopy(kv)}).logits[:, -1]
        reference_rows = decode_step(model, slots, last, lengths)
        rows, chunk = mixed_step(model, slots, last, lengths, joiner[:, 50:83], kv, 50)
    torch.testing.assert_close(rows, reference_rows, rtol=0, atol=1e-4)
    torch.testing.assert_close(chunk, reference_chunk.float(), rtol=0, atol=1e-4)
    assert kv.get_seq_length() == 83  # the joiner's cache now holds the chunk
