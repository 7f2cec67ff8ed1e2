"""The gRPC front-end on the real Triton (tiny profile): the MofServe service through the sync and
async clients and through raw stubs, health, reflection, deadlines, bad input and metrics.

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

from mofserve.clients import AsyncMofServeClient, MofServeClient, MofServeError
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
