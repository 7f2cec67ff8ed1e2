"""The engine's streamed questions without Triton: a fake ``ModelStreamInfer`` plays the
``vqa_<mode>`` ensemble's responses (core/tensors.py, "the `llm` model streams") and records what
the engine sends, so that merging, errors, deadlines and the cancel path are checked exactly."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
from tritonclient.grpc import service_pb2
from tritonclient.utils import serialize_byte_tensor

from mofserve.core import tensors as T
from mofserve.core.profiles import get_profile
from mofserve.core.tensors import FusionMode
from mofserve.server.answers import ASK_OUTPUTS, Answer, Delta
from mofserve.server.engine import EngineError, GenerationParams, Question, Selection, ServingInfo, TritonEngine
from mofserve.server.errors import triton_error, triton_status_code

IMAGE = b"\x89PNG not decoded here"
VQA = T.vqa_model(FusionMode.CLIP)


def response(final: bool = False, error: str = "", **outputs) -> service_pb2.ModelStreamInferResponse:
    """One stream message: ``TEXT_DELTA="Le"``, ``PROMPT_TOKENS=7`` (int32), ``OPTION_SCORES=[...]``."""
    message = service_pb2.ModelStreamInferResponse(error_message=error)
    infer = message.infer_response
    for name, value in outputs.items():
        if isinstance(value, str):
            array, datatype = np.array([[value.encode()]], dtype=object), "BYTES"
            raw = serialize_byte_tensor(array).item()
        elif isinstance(value, int):
            array, datatype = np.array([[value]], dtype=np.int32), "INT32"
            raw = array.tobytes()
        else:
            array, datatype = np.array([value], dtype=np.float32).reshape(1, -1), "FP32"
            raw = array.tobytes()
        infer.outputs.add(name=name, datatype=datatype, shape=array.shape)
        infer.raw_output_contents.append(raw)
    if final:
        infer.parameters["triton_final_response"].bool_param = True
    return message


class FakeTriton:
    """``GRPCInferenceServiceStub`` stand-in: each stream answers with the script for its model
    (responses, and ``"wait"`` to block until ``release``), and every request sent is kept."""

    def __init__(self, script: list) -> None:
        self.script = script
        self.requests: list[service_pb2.ModelInferRequest] = []
        self.release = asyncio.Event()
        self.ended: list[str] = []  # model of each stream read to its end
        self.llm_dead = False  # a killed llm stub: Triton answers "not healthy" to new requests only

    def ModelStreamInfer(self, requests):  # Triton's name
        async def responses():
            model = ""
            async for request in requests:
                model = request.model_name
                self.requests.append(request)
                if request.model_name == T.LLM:  # a CANCEL: one empty final response
                    if self.llm_dead:
                        yield response(final=True, error="Stub process 'llm_0_0' is not healthy.")
                        continue
                    self.release.set()
                    yield response(final=True)
                    continue
                for item in self.script:
                    if item == "never":
                        await asyncio.Event().wait()
                    if item == "wait":
                        await self.release.wait()
                    else:
                        yield item
            self.ended.append(model)

        return responses()


def engine_with(script: list, request_id: bool = True) -> tuple[TritonEngine, FakeTriton]:
    engine = TritonEngine("127.0.0.1:1", ServingInfo("tiny", True))
    fake = FakeTriton(script)
    engine._stub = fake
    inputs = {T.IMAGE, T.QUESTION, T.OPTIONS} | ({T.REQUEST_ID} if request_id else set())
    engine._io[VQA] = (frozenset(inputs), frozenset(ASK_OUTPUTS))
    engine._io[T.LLM] = (frozenset({T.REQUEST_ID, T.CANCEL, T.QUESTION}), frozenset(ASK_OUTPUTS))
    return engine, fake


def question(**generation) -> Question:
    return Question(IMAGE, "Which way?", "(a) Left (b) Right", GenerationParams(**generation))


async def collect(engine: TritonEngine, timeout: float | None = 10) -> list[Delta | Answer]:
    async with contextlib.aclosing(engine.ask_stream(question(), Selection(FusionMode.CLIP), timeout)) as stream:
        return [item async for item in stream]


async def settle(engine: TritonEngine) -> None:
    for _ in range(100):
        if not engine.in_flight:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{engine.in_flight} Triton streams still in flight")


STREAM = [
    response(TEXT_DELTA="Le", CHOSEN_OPTION="a", OPTION_SCORES=[-0.5, -1.5], TIMING_LLM_QUEUE_MS=1.0,
             TIMING_PREFILL_MS=20.0, UPSTREAM_TIMINGS_MS=[2.0, 8.0, float("nan"), 0.5]),
    response(TEXT_DELTA=""),  # a token whose text is not complete yet
    response(TEXT_DELTA="ft"),
    response(final=True, TEXT_DELTA="", ANSWER="Left", CHOSEN_OPTION="a", OPTION_SCORES=[-0.5, -1.5],
             FINISH_REASON="length", PROMPT_TOKENS=300, COMPLETION_TOKENS=3, TIMING_LLM_MS=40.0,
             TIMING_LLM_QUEUE_MS=1.0, TIMING_PREFILL_MS=20.0, TIMING_DECODE_MS=19.0),
]


def test_deltas_then_one_answer_merged_from_every_response():
    engine, fake = engine_with(STREAM)

    async def run():
        items = await collect(engine)
        await settle(engine)
        return items

    items = asyncio.run(run())
    assert items[:2] == [Delta("Le", 1), Delta("ft", 3)]
    answer = items[-1]
    assert isinstance(answer, Answer) and len(items) == 3
    assert (answer.answer, answer.chosen_option, answer.option_scores) == ("Left", "a", [-0.5, -1.5])
    assert answer.finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (300, 3, 303)
    t = answer.timings
    assert (t.preprocess_ms, t.clip_ms, t.dinov2_ms, t.fusion_ms) == (2.0, 8.0, 0.0, 0.5)  # NaN: not run
    assert (t.llm_ms, t.llm_queue_ms, t.prefill_ms, t.decode_ms) == (40.0, 1.0, 20.0, 19.0)
    assert 0 < t.time_to_first_token_ms <= t.total_ms
    request = fake.requests[0]
    assert request.model_name == VQA and request.parameters["triton_enable_empty_final_response"].bool_param
    inputs = {i.name for i in request.inputs}
    assert T.REQUEST_ID in inputs and T.CANCEL not in inputs and len(request.id) == 32
    assert [m for m in fake.ended] == [VQA]  # read to its end; nothing cancelled


def test_ask_reads_the_same_stream_and_a_repository_without_request_id_gets_none():
    engine, fake = engine_with(STREAM, request_id=False)
    answer = asyncio.run(engine.ask(question(), Selection(FusionMode.CLIP), 10))
    assert answer.answer == "Left" and answer.usage.completion_tokens == 3
    assert T.REQUEST_ID not in {i.name for i in fake.requests[0].inputs}


def test_a_model_that_does_not_stream_gives_one_answer_and_its_joined_text():
    engine, _ = engine_with([response(TEXT_DELTA="Ri"), response(TEXT_DELTA="ght")])  # no final flag: the RPC ends
    items = asyncio.run(collect(engine))
    assert [i.text for i in items[:-1]] == ["Ri", "ght"]
    assert items[-1].answer == "Right" and items[-1].finish_reason == "stop"
    assert items[-1].usage.completion_tokens == 2


def test_a_caller_that_stops_reading_cancels_the_sequence_and_the_stream_is_drained():
    engine, fake = engine_with([STREAM[0], "wait", *STREAM[1:]])

    async def run():
        stream = engine.ask_stream(question(), Selection(FusionMode.CLIP), 10)
        first = await anext(stream)
        await stream.aclose()  # the client went away
        await settle(engine)  # the cancel's stream, and the question's, both read to their end
        return first

    first = asyncio.run(run())
    assert first == Delta("Le", 1)
    cancel = fake.requests[1]
    assert cancel.model_name == T.LLM
    sent = {i.name: i for i in cancel.inputs}
    assert set(sent) == {T.REQUEST_ID, T.CANCEL}
    assert cancel.raw_input_contents[0][4:].decode() == fake.requests[0].id  # length-prefixed BYTES
    # a token still arriving after the cancel sends it once more (it may have missed the sequence)
    assert [r.model_name for r in fake.requests] == [VQA, T.LLM, T.LLM]
    assert sorted(fake.ended) == sorted([T.LLM, T.LLM, VQA])  # every stream read to its end


def test_a_deadline_mid_stream_is_deadline_exceeded_and_cancels():
    engine, fake = engine_with([STREAM[0], "wait", *STREAM[1:]])

    async def run():
        with pytest.raises(EngineError) as error:
            await collect(engine, timeout=0.2)
        await settle(engine)
        return error.value

    error = asyncio.run(run())
    assert error.code == "deadline_exceeded" and error.message.startswith("deadline:")
    assert [r.model_name for r in fake.requests][:2] == [VQA, T.LLM]


def test_caller_cancellation_propagates_and_cancels_the_sequence_again_once_it_has_started():
    engine, fake = engine_with(["wait", *STREAM])  # the cancel comes before the sequence's first token

    async def run():
        task = asyncio.ensure_future(collect(engine, timeout=None))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settle(engine)

    asyncio.run(run())
    # the first cancel found no sequence; its first token, arriving after, sent it again (once)
    assert [r.model_name for r in fake.requests] == [VQA, T.LLM, T.LLM]


def test_errors_as_data_keep_their_code_and_a_finished_stream_is_not_cancelled():
    engine, fake = engine_with([response(final=True, FINISH_REASON="error", ERROR_CODE="resource_exhausted",
                                         ERROR_MESSAGE="llm: no KV room for 2000 tokens")])
    with pytest.raises(EngineError) as error:
        asyncio.run(collect(engine))
    assert (error.value.code, error.value.message) == ("resource_exhausted", "llm: no KV room for 2000 tokens")
    assert error.value.field is None  # no ERROR_FIELD (an older repository): the message is not read for one
    assert [r.model_name for r in fake.requests] == [VQA]


def test_the_llm_models_error_field_is_data_that_reaches_the_engine_error():
    engine, _ = engine_with([response(final=True, FINISH_REASON="error", ERROR_CODE="resource_exhausted",
                                      ERROR_MESSAGE="max_new_tokens: a sequence slot holds 256",
                                      ERROR_FIELD="max_new_tokens")])
    with pytest.raises(EngineError) as error:
        asyncio.run(collect(engine))
    assert (error.value.code, error.value.field) == ("resource_exhausted", "max_new_tokens")


def test_an_error_response_in_an_ensemble_maps_by_its_text():
    engine, _ = engine_with([response(final=True, error="in ensemble 'vqa_clip', image: cannot decode (not an "
                                                        "image file)")])
    with pytest.raises(EngineError) as error:
        asyncio.run(collect(engine))
    assert error.value.code == "invalid_argument" and error.value.message.startswith("image: cannot decode")
    assert error.value.field == "image"


def test_a_sequence_the_server_cancelled_is_unavailable_not_an_answer():
    engine, _ = engine_with([response(TEXT_DELTA="Le"), response(final=True, FINISH_REASON="cancelled", ANSWER="Le")])
    with pytest.raises(EngineError) as error:
        asyncio.run(collect(engine))
    assert error.value.code == "unavailable"


@pytest.mark.parametrize(("message", "code", "field"), [
    ("in ensemble 'vqa_clip', image: cannot decode the image (truncated)", "invalid_argument", "image"),
    ("in ensemble 'vqa_clip', question: empty", "invalid_argument", "question"),
    ("texts[3]: not valid UTF-8", "invalid_argument", "texts[3]"),
    ("in ensemble 'embed', image: 7000x6000 pixels exceeds the limit of 1000 (max_pixels)", "too_large", "image"),
    ("Request for unknown model: 'vqa_nope' is not found", "not_found", None),
    ("Exceeds maximum queue size", "resource_exhausted", None),
    ("Stub process 'llm_0_0' is not healthy.", "unavailable", None),
    ("unexpected inference input 'REQUEST_ID' for model 'vqa_clip'", "internal", None),
    ("deadline: not a request field", "internal", None),
])
def test_stream_errors_without_a_status_map_by_their_text(message, code, field):
    error = triton_error(message)
    assert (error.code, error.field) == (code, field)
    assert not message.startswith("in ensemble") or error.message == message.split(", ", 1)[1]


def test_a_unary_errors_status_gives_the_code_and_its_text_the_field():
    error = triton_error("in ensemble 'embed', image: cannot decode the image", "StatusCode.INVALID_ARGUMENT")
    assert (error.code, error.field, error.message) == ("invalid_argument", "image", "image: cannot decode the image")
    assert triton_error("boom", "StatusCode.UNAVAILABLE").field is None


def test_unary_and_stream_statuses_map_through_one_table():
    """tritonclient names a unary call's status "StatusCode.X"; a failed stream RPC gives grpc's
    name "X" and, when the status says nothing known, the stream counts as unreachable."""
    assert triton_status_code("StatusCode.NOT_FOUND") == triton_status_code("NOT_FOUND") == "not_found"
    assert triton_status_code("StatusCode.DEADLINE_EXCEEDED") == "deadline_exceeded"
    assert triton_status_code("DATA_LOSS") == "internal"
    assert triton_status_code("DATA_LOSS", default="unavailable") == "unavailable"


def test_the_answer_carries_the_effective_alpha():
    """The request's alpha, the profile's default for additive, None for the other modes: decided by
    the engine, read as is by both transports."""
    engine, _ = engine_with(STREAM)
    engine._io[T.vqa_model(FusionMode.ADDITIVE)] = engine._io[VQA]

    async def run():
        return [(await engine.ask(question(), selection, 10)).alpha
                for selection in (Selection(FusionMode.ADDITIVE), Selection(FusionMode.ADDITIVE, 0.25),
                                  Selection(FusionMode.CLIP))]

    assert asyncio.run(run()) == [get_profile("tiny").default_alpha, 0.25, None]


def test_ping_llm_is_a_cancel_round_trip():
    engine, fake = engine_with([])
    asyncio.run(engine.ping_llm(5))
    assert [r.model_name for r in fake.requests] == [T.LLM]
    assert {i.name for i in fake.requests[0].inputs} == {T.REQUEST_ID, T.CANCEL}


def test_a_dead_llm_stub_fails_the_streams_it_left_hanging_at_once():
    """Triton never ends the sequences of a killed decoupled stub; the ping finds it dead and every
    stream being read fails as unavailable instead of waiting out its deadline."""
    engine, fake = engine_with([STREAM[0], "never"])  # "never": no further response, ever

    async def run():
        hanging = asyncio.ensure_future(collect(engine, timeout=30))
        while not fake.requests:
            await asyncio.sleep(0.01)
        fake.llm_dead = True
        with pytest.raises(EngineError) as pinged:
            await engine.ping_llm(5)
        with pytest.raises(EngineError) as hung:
            await asyncio.wait_for(hanging, 5)
        return pinged.value, hung.value

    pinged, hung = asyncio.run(run())
    assert pinged.code == "unavailable" and "llm_0_0" in pinged.message
    assert hung.code == "unavailable" and hung.message.startswith("llm: ")
