"""The gRPC API as compiled from the .proto: the service, its methods and messages, and the
compile step that keeps the generated stubs in step with the .proto."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mofserve import protogen
from mofserve.v1 import mofserve_pb2 as pb
from mofserve.v1 import mofserve_pb2_grpc as pb_grpc

METHODS = {
    "Ask": ("AskRequest", "AskResponse"),
    "Compare": ("CompareRequest", "CompareResponse"),
    "Encode": ("EncodeRequest", "EncodeResponse"),
    "Embed": ("EmbedRequest", "EmbedResponse"),
    "EmbedText": ("EmbedTextRequest", "EmbedTextResponse"),
    "GetServerInfo": ("GetServerInfoRequest", "ServerInfo"),
}
STREAMING = {"AskStream": ("AskRequest", "AskStreamResponse")}  # server-streaming


def test_descriptor_has_the_service_and_its_methods():
    assert pb.DESCRIPTOR.package == "mofserve.v1"
    service = pb.DESCRIPTOR.services_by_name["MofServe"]
    assert service.full_name == "mofserve.v1.MofServe"
    assert set(service.methods_by_name) == set(METHODS) | set(STREAMING)
    for name, (request, response) in {**METHODS, **STREAMING}.items():
        method = service.methods_by_name[name]
        assert (method.input_type.name, method.output_type.name) == (request, response)
        assert not method.client_streaming and method.server_streaming == (name in STREAMING)
    assert hasattr(pb_grpc, "MofServeStub") and hasattr(pb_grpc, "add_MofServeServicer_to_server")


def test_ask_stream_messages_are_deltas_then_one_final_answer():
    event = pb.AskStreamResponse.DESCRIPTOR.oneofs_by_name["event"]
    assert [f.name for f in event.fields] == ["delta", "final"]
    assert pb.AskStreamResponse(delta=pb.TokenDelta(text="Le", completion_tokens=1)).WhichOneof("event") == "delta"
    final = pb.AskStreamResponse(final=pb.AskResponse(answer="Left", finish_reason="stop"))
    assert final.WhichOneof("event") == "final" and final.final.answer == "Left"


@pytest.mark.parametrize(("message", "field"), [
    ("AskRequest", "alpha"), ("ModeSelection", "alpha"), ("EncodeRequest", "alpha"), ("AskResponse", "alpha"),
    ("GenerationParams", "max_new_tokens"), ("GenerationParams", "temperature"), ("GenerationParams", "top_p"),
    ("GenerationParams", "seed"), ("ServerInfo", "default_alpha"), ("EmbedTextResponse", "logit_scale"),
])
def test_optional_scalars_tell_unset_from_zero(message, field):
    cls = getattr(pb, message)
    assert cls.DESCRIPTOR.fields_by_name[field].has_presence
    unset, zero = cls(), cls(**{field: 0})
    assert not unset.HasField(field) and zero.HasField(field)


def test_ask_response_carries_answer_option_timings_and_provenance():
    fields = set(pb.AskResponse.DESCRIPTOR.fields_by_name)
    assert {"answer", "chosen_option", "option_scores", "timings", "mode", "alpha", "provenance", "usage",
            "finish_reason"} <= fields
    assert set(pb.StageTimings.DESCRIPTOR.fields_by_name) == {
        "preprocess_ms", "encoders_ms", "clip_ms", "dinov2_ms", "fusion_ms", "llm_ms", "total_ms", "llm_queue_ms",
        "prefill_ms", "decode_ms", "time_to_first_token_ms"}
    assert set(pb.Usage.DESCRIPTOR.fields_by_name) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert {"profile", "random_weights", "notice", "model_versions"} == set(pb.Provenance.DESCRIPTOR.fields_by_name)


def test_engine_timings_map_onto_the_proto_one_to_one():
    from mofserve.server.engine import StageTimings

    assert set(StageTimings().as_dict()) == set(pb.StageTimings.DESCRIPTOR.fields_by_name)


def _scratch_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the .proto and an output root, as a checkout lays them out."""
    root = tmp_path / "protos"
    (root / protogen.PROTO_RELPATH).parent.mkdir(parents=True)
    shutil.copy(protogen.proto_root() / protogen.PROTO_RELPATH, root / protogen.PROTO_RELPATH)
    out = tmp_path / "out"
    (out / "mofserve" / "v1").mkdir(parents=True)
    return root, out


def test_generate_writes_the_stubs_and_staleness_follows_the_proto(tmp_path):
    root, out = _scratch_checkout(tmp_path)
    assert protogen.is_stale(out, root)  # nothing generated yet
    written = protogen.generate(out, root)
    assert sorted(p.name for p in written) == sorted(protogen.GENERATED)
    assert not protogen.is_stale(out, root)
    assert "class MofServeStub" in (out / "mofserve/v1/mofserve_pb2_grpc.py").read_text()
    assert not [p for p in (out / "mofserve/v1").iterdir() if p.name.startswith(".protogen-")]
    later = (out / "mofserve/v1/mofserve_pb2.py").stat().st_mtime + 10
    os.utime(root / protogen.PROTO_RELPATH, (later, later))  # a developer edits the .proto
    assert protogen.is_stale(out, root)


def test_an_edited_proto_is_recompiled_on_import(tmp_path):
    """A scratch checkout (mofserve/ + server/protos/): ``import mofserve.v1`` compiles the missing
    stubs, and compiles again after the .proto is edited."""
    repo = Path(protogen.__file__).resolve().parents[1]
    for name in ("mofserve/__init__.py", "mofserve/protogen.py", "mofserve/v1/__init__.py",
                 f"server/protos/{protogen.PROTO_RELPATH}"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo / name, tmp_path / name)
    probe = ("import mofserve, mofserve.v1.mofserve_pb2 as pb; "
             "print(mofserve.__file__); print(' '.join(pb.DESCRIPTOR.message_types_by_name))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def imported() -> list[str]:
        out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=120, check=True).stdout.splitlines()
        assert out[0] == str(tmp_path / "mofserve/__init__.py")  # the scratch copy, not the checkout
        return out[1].split()

    assert "AskRequest" in imported() and "Added" not in imported()
    proto = tmp_path / "server/protos" / protogen.PROTO_RELPATH
    proto.write_text(proto.read_text() + "\nmessage Added { int32 x = 1; }\n")
    later = (tmp_path / "mofserve/v1/mofserve_pb2.py").stat().st_mtime + 10
    os.utime(proto, (later, later))
    assert "Added" in imported()

    # stubs from a compiler newer than this runtime (a wheel built with the latest grpcio-tools)
    stub = tmp_path / "mofserve/v1/mofserve_pb2.py"
    stub.write_text(re.sub(r"Domain\.PUBLIC,\s*\d+,", "Domain.PUBLIC,\n    99,", stub.read_text(), count=1))
    assert "99," in stub.read_text()
    assert "Added" in imported()  # recompiled with this environment's grpcio-tools
    assert "99," not in stub.read_text()


def test_checkout_stubs_are_current_and_the_cli_check_says_so():
    assert protogen.in_checkout()
    result = subprocess.run([sys.executable, "-m", "mofserve.protogen", "--check"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_wheel_build_hook_compiles_into_the_build_folder(tmp_path):
    """What ``pip install .`` runs: setup.py's build_py writes the stubs into build_lib."""
    repo = Path(protogen.__file__).resolve().parents[1]
    build_lib = tmp_path / "lib"
    subprocess.run([sys.executable, str(repo / "setup.py"), "-q", "build_py", "--build-lib", str(build_lib)],
                   cwd=repo, check=True, capture_output=True, timeout=300)
    for name in (*protogen.GENERATED, "__init__.py"):
        assert (build_lib / "mofserve/v1" / name).is_file(), name
    assert (build_lib / "mofserve/server/protos/mofserve/v1/mofserve.proto").is_file()
