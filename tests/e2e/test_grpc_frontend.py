"""The gRPC front-end on the real Triton (tiny profile): the MofServe service through the sync and
async clients and through raw stubs (AskStream's token stream included), health, reflection,
deadlines, bad input and metrics.

The server runs on ``loop_thread``'s loop (as in ``mofserve serve``); calls come from this thread.
"""

from __future__ import annotations

import io
import json
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tritongrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from mofserve.clients import AskResult, AsyncMofServeClient, MofServeClient, MofServeError, TokenDelta
from mofserve.core import tensors as T
from mofserve.core.tensors import FusionMode
from mofserve.server.grpc_service import HEALTH_SERVICE_NAME, SERVICE_NAME
from mofserve.v1 import mofserve_pb2 as pb
from mofserve.v1 import mofserve_pb2_grpc as pb_grpc

from .images import drawing, fresh_image, png

pytestmark = pytest.mark.integration

QUESTION = "Which side is the red disc on?"
OPTIONS = "(a) Left (b) Right"
NOTICE = "tiny profile: seeded random weights, answers are not meaningful"


IMAGE = drawing()


@pytest.fixture(scope="module")
def client(served):
    with MofServeClient(served.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served.target) as channel:
        yield pb_grpc.MofServeStub(channel)


def encoder_misses(server, model: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mofserve_encoder_cache_total{") and f'model="{model}"' in line
               and 'result="miss"' in line)


# ---- the four RPCs --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [m.value for m in FusionMode])
def test_ask_answers_in_every_mode_with_timings_and_the_random_weights_notice(client, mode):
    result = client.ask(IMAGE, QUESTION, options=OPTIONS, mode=mode, max_new_tokens=4)
    assert isinstance(result.answer, str)
    assert result.mode == mode
    assert result.chosen_option in {"a", "b"}
    assert len(result.option_scores) == 2 and all(np.isfinite(result.option_scores))
    t = result.timings
    assert t.llm_ms > 0 and t.preprocess_ms >= 0 and t.total_ms >= t.llm_ms
    assert t.encoders_ms == max(t.clip_ms, t.dinov2_ms)
    assert result.random_weights and result.notice == NOTICE
    assert result.provenance.profile == "tiny"
    assert result.alpha == (0.75 if mode == "additive" else None)  # the profile's default, reported


def test_ask_through_raw_stubs_distinguishes_unset_alpha_from_zero(stub):
    base = dict(image=IMAGE, question=QUESTION, options=OPTIONS, mode="additive",
                generation=pb.GenerationParams(max_new_tokens=2, seed=0))
    zero = stub.Ask(pb.AskRequest(**base, alpha=0.0), timeout=60)
    assert zero.HasField("alpha") and zero.alpha == 0.0
    default = stub.Ask(pb.AskRequest(**base), timeout=60)
    assert default.alpha == 0.75
    free_form = stub.Ask(pb.AskRequest(image=IMAGE, question=QUESTION), timeout=60)  # mode "" = interleaved
    assert free_form.mode == "interleaved" and free_form.chosen_option == "" and not free_form.HasField("alpha")
    assert free_form.provenance.random_weights and free_form.provenance.notice == NOTICE


def test_compare_answers_every_mode_and_runs_the_encoders_once(client, tiny_triton):
    image = fresh_image()
    clip0, dino0 = encoder_misses(tiny_triton, T.CLIP_VISION), encoder_misses(tiny_triton, T.DINOV2_VISION)
    modes = ["interleaved", "clip", ("additive", 0.5)]
    results = client.compare(image, QUESTION, options=OPTIONS, modes=modes, max_new_tokens=2)
    assert [r.mode for r in results] == ["interleaved", "clip", "additive"]
    assert results[2].alpha == 0.5
    assert all(r.chosen_option in {"a", "b"} and r.random_weights for r in results)
    assert encoder_misses(tiny_triton, T.CLIP_VISION) - clip0 == 1
    assert encoder_misses(tiny_triton, T.DINOV2_VISION) - dino0 == 1  # the later modes hit the cache


@pytest.mark.parametrize("mode", ["interleaved", "additive"])
def test_encode_returns_the_tokens_of_the_tokens_ensemble(client, tiny_triton, mode):
    alpha = 0.25 if mode == "additive" else None
    result = client.encode_result(IMAGE, mode=mode, alpha=alpha)
    inputs = [tritongrpc.InferInput(T.IMAGE, [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[IMAGE]], dtype=object))
    if alpha is not None:
        inputs.append(tritongrpc.InferInput(T.ALPHA, [1, 1], "FP32"))
        inputs[1].set_data_from_numpy(np.array([[alpha]], dtype=np.float32))
    direct = tritongrpc.InferenceServerClient(tiny_triton.grpc_url).infer(T.tokens_model(mode), inputs)
    want = direct.as_numpy(T.VISUAL_TOKENS)[0]
    assert result.tokens.dtype == np.float32 and result.tokens.shape == want.shape
    assert result.tokens.shape[0] == T.token_count(mode, 256)
    np.testing.assert_allclose(result.tokens, want, rtol=0, atol=1e-6)
    assert result.alpha == alpha and result.provenance.random_weights


def test_embed_gives_one_embedding_per_image_and_cosines_for_two(client):
    mirrored = png(Image.open(io.BytesIO(IMAGE)).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    pair = client.embed([IMAGE, mirrored])
    assert pair.clip.shape == (2, 24) and pair.dinov2.shape == (2, 32)
    assert -1 <= pair.clip_cosine <= 1 and -1 <= pair.dinov2_cosine <= 1
    same = client.embed([IMAGE, IMAGE])
    assert same.clip_cosine == pytest.approx(1, abs=1e-5) and same.dinov2_cosine == pytest.approx(1, abs=1e-5)
    three = client.embed([IMAGE, mirrored, IMAGE])
    assert three.clip.shape[0] == 3 and three.clip_cosine is None
    np.testing.assert_allclose(three.clip[0], pair.clip[0], atol=1e-6)


def test_server_info_names_modes_default_alpha_and_limits(client, engine):
    info = client.server_info()
    assert info.modes == [m.value for m in FusionMode] and info.default_mode == "interleaved"
    assert info.default_alpha == 0.75 and info.provenance.random_weights
    assert info.limits["max_image_bytes"] == engine.limits.max_image_bytes
    assert info.limits["max_message_bytes"] > engine.limits.max_image_bytes


def test_async_client_on_the_servers_loop(served, loop_thread):
    async def go():
        async with AsyncMofServeClient(served.target, timeout=60) as c:
            answer = await c.ask(IMAGE, QUESTION, options=OPTIONS, mode="clip", max_new_tokens=2)
            tokens = await c.encode(IMAGE, mode="clip")
            return answer, tokens, await c.health()

    answer, tokens, health = loop_thread.run(go())
    assert answer.chosen_option in {"a", "b"} and tokens.shape == (256, tokens.shape[1])
    assert health == "SERVING"


def test_ask_command_prints_a_table_and_the_notice(served, tmp_path, capsys):
    from mofserve.cli import main

    image = tmp_path / "card.png"
    image.write_bytes(IMAGE)
    common = ["ask", "--image", str(image), "--question", QUESTION, "--options", OPTIONS, "--server", served.target,
              "--max-new-tokens", "2"]
    assert main(common) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["mode", "option"] and out[1].split()[0] == "interleaved"
    assert out[-1] == f"NOTE: {NOTICE}"
    assert main([*common, "--compare", "clip", "additive", "--alpha", "0.5", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [(p["mode"], p["alpha"]) for p in payload] == [("clip", None), ("additive", 0.5)]
    assert main([*common, "--mode", "clip", "--alpha", "0.5"]) == 1
    assert "INVALID_ARGUMENT: alpha:" in capsys.readouterr().err


# ---- AskStream ---------------------------------------------------------------------------------


def test_ask_stream_yields_deltas_then_a_final_whose_answer_is_their_text(client):
    items = list(client.ask_stream(IMAGE, QUESTION, options=OPTIONS, mode="clip", max_new_tokens=8))
    deltas, final = items[:-1], items[-1]
    assert len(deltas) >= 2 and all(isinstance(d, TokenDelta) and d.text for d in deltas)
    assert isinstance(final, AskResult) and final.answer == "".join(d.text for d in deltas)
    counts = [d.completion_tokens for d in deltas]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] <= final.usage.completion_tokens
    usage = final.usage
    # the prompt holds the 256 visual tokens of the clip mode and the question's text tokens
    assert usage.prompt_tokens > T.token_count("clip", 256) and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # the tiny LM's random weights never emit EOS: every answer runs to max_new_tokens
    assert (final.finish_reason, usage.completion_tokens) == ("length", 8)
    assert final.chosen_option in {"a", "b"} and len(final.option_scores) == 2 and final.notice == NOTICE
    t = final.timings
    assert t.prefill_ms > 0 and t.decode_ms > 0 and t.llm_queue_ms >= 0 and t.llm_ms >= t.prefill_ms
    assert t.preprocess_ms > 0 and t.clip_ms >= 0 and t.dinov2_ms == 0  # clip mode runs no DINOv2
    assert 0 < t.time_to_first_token_ms <= t.total_ms


def test_ask_and_ask_stream_give_the_same_answer_and_usage(client):
    kwargs = dict(options=OPTIONS, mode="interleaved", max_new_tokens=6)
    unary = client.ask(IMAGE, QUESTION, **kwargs)
    streamed = list(client.ask_stream(IMAGE, QUESTION, **kwargs))[-1]
    assert (streamed.answer, streamed.chosen_option, streamed.usage, streamed.finish_reason) == (
        unary.answer, unary.chosen_option, unary.usage, unary.finish_reason)
    np.testing.assert_allclose(streamed.option_scores, unary.option_scores, atol=1e-6)
    assert unary.usage.completion_tokens == 6 and unary.usage.prompt_tokens > T.token_count("interleaved", 256)
    compared = client.compare(IMAGE, QUESTION, options=OPTIONS, modes=["interleaved"], max_new_tokens=6)[0]
    assert (compared.usage, compared.finish_reason) == (unary.usage, unary.finish_reason)


def test_ask_stream_through_raw_stubs_and_the_async_client(stub, served, loop_thread):
    messages = list(stub.AskStream(pb.AskRequest(image=IMAGE, question=QUESTION, mode="dinov2",
                                                 generation=pb.GenerationParams(max_new_tokens=4)), timeout=60))
    assert [m.WhichOneof("event") for m in messages[:-1]] == ["delta"] * (len(messages) - 1)
    final = messages[-1].final
    assert messages[-1].WhichOneof("event") == "final" and final.usage.completion_tokens == 4
    assert final.answer == "".join(m.delta.text for m in messages[:-1]) and final.finish_reason == "length"

    async def go():
        async with AsyncMofServeClient(served.target, timeout=60) as c:
            return [item async for item in c.ask_stream(IMAGE, QUESTION, mode="clip", max_new_tokens=3)]

    items = loop_thread.run(go())
    assert isinstance(items[-1], AskResult) and items[-1].usage.completion_tokens == 3
    assert items[-1].answer == "".join(i.text for i in items[:-1])


@pytest.mark.parametrize(("overrides", "field"), [
    (dict(question=" "), "question:"),  # the front-end's check
    (dict(image=b"\x89PNG\r\n\x1a\n" + b"garbage" * 20), "image:"),  # Triton's preprocess, through the stream
    (dict(mode="clip", alpha=0.5), "alpha:"),
])
def test_ask_stream_bad_input_fails_before_any_message(stub, overrides, field):
    request = {**dict(image=IMAGE, question=QUESTION, options=OPTIONS, mode="interleaved"), **overrides}
    call = stub.AskStream(pb.AskRequest(**request), timeout=30)
    with pytest.raises(grpc.RpcError) as error:
        next(call)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert error.value.details().startswith(field), error.value.details()


def test_ask_stream_deadline_mid_stream_ends_it_and_the_server_goes_on(client):
    got: list = []
    with pytest.raises(MofServeError) as error:
        for item in client.ask_stream(fresh_image(), QUESTION, max_new_tokens=512, timeout=0.3):
            got.append(item)
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not any(isinstance(i, AskResult) for i in got)
    assert list(client.ask_stream(IMAGE, QUESTION, max_new_tokens=2))[-1].usage.completion_tokens == 2


def test_ask_command_streams_tokens_then_the_table(served, tmp_path, capsys):
    from mofserve.cli import main

    image = tmp_path / "card.png"
    image.write_bytes(IMAGE)
    assert main(["ask", "--image", str(image), "--question", QUESTION, "--server", served.target,
                 "--max-new-tokens", "5", "--mode", "clip", "--stream"]) == 0
    out = capsys.readouterr().out
    # the streamed text (random weights: any characters, newlines too), then the table
    table = out[out.rindex("\nmode ") + 1:].split("\n")
    header = table[0].split()
    assert header[:2] == ["mode", "option"] and "tokens" in header and "finish" in header
    assert table[1].startswith("clip") and " length " in table[1] and "+5 " in table[1]


# ---- health, reflection, deadlines -------------------------------------------------------------


def test_health_follows_set_serving_and_requests_fail_fast_while_down(served, loop_thread):
    with MofServeClient(served.target, timeout=30, retries=False) as c:
        assert c.health() == "SERVING" and c.health(SERVICE_NAME) == "SERVING"
        served.health.set_serving(False)  # from another thread: applied before it returns
        try:
            assert c.health() == "NOT_SERVING" and c.health(SERVICE_NAME) == "NOT_SERVING"
            started = time.perf_counter()
            with pytest.raises(MofServeError) as error:
                c.ask(IMAGE, QUESTION)
            assert error.value.code == grpc.StatusCode.UNAVAILABLE and time.perf_counter() - started < 2
        finally:
            async def up():  # from the server's loop: a task the caller may await
                await served.health.set_serving(True)

            loop_thread.run(up())
        assert c.health() == "SERVING" and c.health(SERVICE_NAME) == "SERVING"
        with pytest.raises(MofServeError) as error:
            c.health("no.such.Service")
        assert error.value.code == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(served):
    with grpc.insecure_channel(served.target) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(reflect.ServerReflectionInfo(iter([request]), timeout=10)))
        names = {s.name for s in response.list_services_response.service}
        assert {SERVICE_NAME, HEALTH_SERVICE_NAME, "grpc.reflection.v1alpha.ServerReflection"} <= names
        symbol = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
        files = next(iter(reflect.ServerReflectionInfo(iter([symbol]), timeout=10)))
        assert files.file_descriptor_response.file_descriptor_proto
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


# (deadline, max_new_tokens): expired before it is sent; expired mid-flight (256 greedy tokens of
# the tiny LLM take 250+ ms: its random weights never emit EOS)
@pytest.mark.parametrize(("timeout", "tokens"), [(0.001, None), (0.1, 256)])
def test_an_expired_deadline_gives_deadline_exceeded_quickly_and_the_server_goes_on(client, timeout, tokens):
    started = time.perf_counter()
    with pytest.raises(MofServeError) as error:
        client.ask(fresh_image(), QUESTION, options=OPTIONS, max_new_tokens=tokens, timeout=timeout)
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.perf_counter() - started < 2
    assert client.ask(IMAGE, QUESTION, options=OPTIONS, max_new_tokens=2).chosen_option in {"a", "b"}


def test_abandoned_requests_never_take_triton_down(client, tiny_triton):
    """Triton 2.51 crashes when an in-flight gRPC inference is cancelled (server#7368); the engine
    lets an abandoned call finish instead, so deadlines that expire mid-flight are harmless."""
    for timeout in [0.001, 0.005, 0.02, 0.05, 0.1, 0.2] * 2:
        try:
            client.ask(fresh_image(), QUESTION, options=OPTIONS, max_new_tokens=64, timeout=timeout)
        except MofServeError as error:
            assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert tiny_triton.is_alive()
    assert client.ask(IMAGE, QUESTION, options=OPTIONS, max_new_tokens=2).chosen_option in {"a", "b"}


# ---- bad input ---------------------------------------------------------------------------------------


BAD_ASKS = {
    "unknown mode": (dict(mode="bogus"), "mode:"),
    "alpha out of range": (dict(mode="additive", alpha=1.5), "alpha:"),
    "alpha with a non-additive mode": (dict(mode="clip", alpha=0.5), "alpha:"),
    "empty question": (dict(question="  "), "question:"),
    "empty image": (dict(image=b""), "image:"),
    "garbage image bytes": (dict(image=b"\x89PNG\r\n\x1a\n" + b"garbage" * 20), "image:"),
    "malformed options": (dict(options="a) Left b) Right"), "options:"),
    "max_new_tokens": (dict(generation=pb.GenerationParams(max_new_tokens=0)), "max_new_tokens:"),
    "temperature": (dict(generation=pb.GenerationParams(temperature=9)), "temperature:"),
}


@pytest.mark.parametrize("case", list(BAD_ASKS))
def test_bad_input_is_invalid_argument_naming_the_field(stub, case):
    overrides, field = BAD_ASKS[case]
    request = dict(image=IMAGE, question=QUESTION, options=OPTIONS, mode="interleaved")
    request.update(overrides)
    with pytest.raises(grpc.RpcError) as error:
        stub.Ask(pb.AskRequest(**request), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert error.value.details().startswith(field), error.value.details()


def test_bad_input_in_every_rpc_and_the_server_keeps_serving(client, stub, served):
    cases = [
        (lambda: stub.Compare(pb.CompareRequest(image=IMAGE, question=QUESTION), timeout=10), "modes:"),
        (lambda: stub.Compare(pb.CompareRequest(image=IMAGE, question=QUESTION, modes=[
            pb.ModeSelection(mode="clip"), pb.ModeSelection(mode="nope")]), timeout=10), "modes[1].mode:"),
        (lambda: stub.Encode(pb.EncodeRequest(image=IMAGE, mode="clip", alpha=0.3), timeout=10), "alpha:"),
        (lambda: stub.Encode(pb.EncodeRequest(image=b""), timeout=10), "image:"),
        (lambda: stub.Embed(pb.EmbedRequest(), timeout=10), "images:"),
        (lambda: stub.Embed(pb.EmbedRequest(images=[IMAGE, b""]), timeout=10), "images[1]:"),
    ]
    for call, field in cases:
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert error.value.details().startswith(field), error.value.details()
    assert client.health() == "SERVING"
    assert client.ask(IMAGE, QUESTION, options=OPTIONS, max_new_tokens=2).chosen_option in {"a", "b"}


def test_oversize_requests_are_resource_exhausted(client, engine):
    limit = engine.limits.max_image_bytes
    with pytest.raises(MofServeError) as error:  # over the image limit, under the message limit: the engine
        client.ask(b"\0" * (limit + 1), QUESTION)
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.value.message.startswith("image:")
    with pytest.raises(MofServeError) as error:  # over the message limit: grpc itself, before reading it
        client.ask(b"\0" * (limit + (2 << 20)), QUESTION)
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.health() == "SERVING"


def test_requests_are_counted_by_method_mode_and_status(client, metrics):
    client.ask(IMAGE, QUESTION, mode="clip", max_new_tokens=2)
    list(client.ask_stream(IMAGE, QUESTION, mode="clip", max_new_tokens=2))
    with pytest.raises(MofServeError):
        client.ask(IMAGE, QUESTION, mode="bogus")
    text = metrics.exposition().decode()
    ok = [line for line in text.splitlines() if line.startswith("mofserve_requests_total{")
          and 'transport="grpc"' in line and 'method="Ask"' in line and 'mode="clip"' in line
          and 'status="ok"' in line]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 1
    assert any('method="Ask"' in line and 'mode="invalid"' in line and 'status="invalid_argument"' in line
               for line in text.splitlines() if line.startswith("mofserve_requests_total{"))
    assert 'mofserve_stage_seconds_count{mode="clip",stage="llm"}' in text
    assert 'mofserve_stage_seconds_count{mode="clip",stage="prefill"}' in text
    assert 'mofserve_time_to_first_token_seconds_count{mode="clip",transport="grpc"}' in text
    assert any(line.startswith('mofserve_tokens_total{kind="completion",mode="clip"}') for line in text.splitlines())
    assert any('method="AskStream"' in line and 'status="ok"' in line
               for line in text.splitlines() if line.startswith("mofserve_requests_total{"))
