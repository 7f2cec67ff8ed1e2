"""The client library without a server: light imports, requests, results, errors and the CLI table."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest

from mofserve.cli import build_parser
from mofserve.clients import AskResult, MofServeClient, MofServeError, Timings
from mofserve.clients.cli import format_table
from mofserve.clients.client import ask_request, compare_request, embed_request, encode_request, mode_selections
from mofserve.clients.results import EmbedResult, Provenance, tensor_to_numpy
from mofserve.v1 import mofserve_pb2 as pb


def test_the_client_installs_light():
    code = ("import sys, mofserve.clients, mofserve.clients.cli; "
            "heavy = [m for m in ('mofserve.server', 'mofserve.core', 'tritonclient', 'torch', 'transformers', "
            "'onnxruntime', 'PIL', 'grpc_tools.protoc') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_ask_request_reads_paths_and_leaves_unset_optionals_unset(tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(b"\x89PNG fake")
    request = ask_request(image, "Q?", options="(a) x (b) y", mode="clip", seed=0)
    assert request.image == b"\x89PNG fake" and request.mode == "clip" and request.options == "(a) x (b) y"
    assert not request.HasField("alpha") and not request.generation.HasField("temperature")
    assert request.generation.HasField("seed") and request.generation.seed == 0
    assert ask_request(str(image), "Q?", alpha=0.0).HasField("alpha")
    assert ask_request(bytearray(b"abc"), "Q?").image == b"abc"
    with pytest.raises(FileNotFoundError):
        ask_request(tmp_path / "missing.png", "Q?")


def test_mode_selections_give_alpha_to_bare_additive_entries_only():
    selections = mode_selections(["clip", "additive", ("additive", 0.2), ("interleaved", None)], alpha=0.6)
    assert [(s.mode, s.alpha if s.HasField("alpha") else None) for s in selections] == [
        ("clip", None), ("additive", 0.6), ("additive", 0.2), ("interleaved", None)]
    request = compare_request(b"img", "Q?", modes=["clip", "dinov2"])
    assert [m.mode for m in request.modes] == ["clip", "dinov2"]
    assert encode_request(b"img", "additive", 0.5).alpha == 0.5


def test_embed_request_wants_a_list():
    assert len(embed_request([b"a", b"b"]).images) == 2
    with pytest.raises(TypeError, match="list of images"):
        embed_request(b"one image")


def test_tensor_bytes_are_little_endian_float32_and_come_back_writable():
    array = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    message = pb.Tensor(data=array.astype("<f4").tobytes(), shape=[3, 4], dtype="float32")
    back = tensor_to_numpy(message)
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable and back.dtype == np.float32
    with pytest.raises(ValueError, match="dtype"):
        tensor_to_numpy(pb.Tensor(data=b"", shape=[0], dtype="nonsense"))


def test_results_from_protobufs():
    response = pb.AskResponse(answer="Left", chosen_option="a", option_scores=[-0.5, -1.5],
                              timings=pb.StageTimings(llm_ms=5, total_ms=9), mode="additive", alpha=0.75,
                              provenance=pb.Provenance(profile="tiny", random_weights=True, notice="n",
                                                       model_versions={"llm": "1"}))
    result = AskResult.from_proto(response)
    assert (result.answer, result.chosen_option, result.alpha, result.random_weights, result.notice) == (
        "Left", "a", 0.75, True, "n")
    assert result.timings.llm_ms == 5 and result.provenance.model_versions == {"llm": "1"}
    assert json.loads(json.dumps(result.to_dict()))["provenance"]["profile"] == "tiny"
    assert AskResult.from_proto(pb.AskResponse(mode="clip")).alpha is None

    def vector(values):
        return pb.Tensor(data=np.asarray(values, "<f4").tobytes(), shape=[len(values)], dtype="float32")

    embed = EmbedResult.from_proto(pb.EmbedResponse(embeddings=[
        pb.ImageEmbedding(clip=vector([1, 0]), dinov2=vector([0, 1, 0])),
        pb.ImageEmbedding(clip=vector([0, 1]), dinov2=vector([1, 0, 0]))],
        similarity=pb.Similarity(clip_cosine=0.0, dinov2_cosine=0.0)))
    assert embed.clip.shape == (2, 2) and embed.dinov2.shape == (2, 3) and embed.clip_cosine == 0.0
    alone = EmbedResult.from_proto(pb.EmbedResponse(embeddings=[pb.ImageEmbedding(clip=vector([1]),
                                                                                  dinov2=vector([1]))]))
    assert alone.clip_cosine is None


def test_an_unreachable_server_is_unavailable_not_a_raw_rpc_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket closes
    with MofServeClient(f"127.0.0.1:{port}", timeout=5, retries=False) as client, \
            pytest.raises(MofServeError) as error:
        client.ask(b"img", "Q?")
    assert error.value.code == grpc.StatusCode.UNAVAILABLE and str(error.value).startswith("UNAVAILABLE: ")


def test_table_has_a_row_per_answer_with_stage_timings():
    def answer(mode, alpha, text):
        return AskResult(text, "b", [-1.0, -0.5], Timings(1.0, 20.0, 20.0, 15.0, 0.5, 100.0, 130.0), mode, alpha,
                         Provenance("tiny", True, "tiny profile: ..."))

    table = format_table([answer("clip", None, "Right"), answer("additive", 0.5, "word " * 40)]).splitlines()
    assert table[0].split()[:3] == ["mode", "option", "preprocess"] and table[0].endswith("answer")
    assert table[1].startswith("clip") and table[1].endswith("Right") and "130.0" in table[1]
    assert table[2].startswith("additive(0.5)") and table[2].endswith("…")


def test_ask_subcommand_arguments():
    args = build_parser().parse_args(["ask", "--image", "x.png", "--question", "Q?", "--compare", "clip", "additive",
                                      "--alpha", "0.3", "--seed", "1", "--json"])
    assert args.compare == ["clip", "additive"] and args.alpha == 0.3 and args.seed == 1 and args.json
    assert args.server == "127.0.0.1:50051" and args.mode == "interleaved"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ask", "--image", "x", "--question", "q", "--mode", "clip", "--compare", "clip"])


def test_embed_text_request_wants_a_list_and_results_decode():
    from mofserve.clients.client import embed_text_request
    from mofserve.clients.results import TextEmbedResult

    assert list(embed_text_request(("a photo of a cat", "a photo of a dog")).texts) == ["a photo of a cat",
                                                                                         "a photo of a dog"]
    with pytest.raises(TypeError, match="list of texts"):
        embed_text_request("one text")
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    message = pb.EmbedTextResponse(embeddings=[pb.Tensor(data=r.astype("<f4").tobytes(), shape=[3], dtype="float32")
                                               for r in rows], total_ms=1.5, provenance=pb.Provenance(profile="tiny"))
    result = TextEmbedResult.from_proto(message)
    np.testing.assert_array_equal(result.embeddings, rows)
    assert result.logit_scale is None and result.provenance.profile == "tiny"
    message.logit_scale = 100.0
    assert TextEmbedResult.from_proto(message).logit_scale == 100.0


def test_stream_messages_become_deltas_then_the_result():
    from mofserve.clients import TokenDelta, Usage
    from mofserve.clients.results import stream_item

    assert stream_item(pb.AskStreamResponse(delta=pb.TokenDelta(text="Le", completion_tokens=1))) == TokenDelta("Le", 1)
    final = stream_item(pb.AskStreamResponse(final=pb.AskResponse(
        answer="Left", mode="clip", finish_reason="length",
        usage=pb.Usage(prompt_tokens=300, completion_tokens=2, total_tokens=302),
        timings=pb.StageTimings(prefill_ms=4, time_to_first_token_ms=9))))
    assert isinstance(final, AskResult) and final.answer == "Left" and final.finish_reason == "length"
    assert final.usage == Usage(300, 2, 302)
    assert (final.timings.prefill_ms, final.timings.time_to_first_token_ms) == (4, 9)
    assert json.loads(json.dumps(final.to_dict()))["usage"]["total_tokens"] == 302


def test_ask_stream_flag_and_the_table_says_tokens_and_finish_reason(capsys):
    from mofserve.clients.cli import run as run_ask

    args = build_parser().parse_args(["ask", "--image", "x.png", "--question", "Q?", "--stream"])
    assert args.stream and not args.compare
    both = build_parser().parse_args(["ask", "--image", "x.png", "--question", "Q?", "--stream", "--compare", "clip"])
    assert run_ask(both) == 2 and "--stream" in capsys.readouterr().err
    from mofserve.clients import Usage

    row = AskResult("Left", "a", [-1.0, -2.0], Timings(), "clip", None, Provenance(), Usage(300, 2, 302), "length")
    table = format_table([row]).splitlines()
    assert table[0].split()[-3:] == ["tokens", "finish", "answer"]
    assert table[1].split()[-3:] == ["300+2", "length", "Left"]
