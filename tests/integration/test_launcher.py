"""The launcher against the real tritonserver shipped by nvidia-pytriton (CPU only).

Each test builds its own tiny python-backend model repository in a temporary folder, so these
tests depend on nothing but the launcher and the wheel. One server start/stop costs about 2 + 3 s
on 2 cores; the read-only checks share one server to keep the file well under a minute.
"""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mofserve.server.launcher import TritonServer, TritonStartError
from mofserve.server.triton_install import TritonNotInstalledError, find_tritonserver
from mofserve.server.triton_resources import SHM_DIR

pytestmark = pytest.mark.integration

try:
    find_tritonserver()
except TritonNotInstalledError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"tritonserver not available: {exc}", allow_module_level=True)

IDENTITY_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

IDENTITY_MODEL = """\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            array = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", array.copy())]))
        return responses
"""

BROKEN_MODEL = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("mofserve-test: deliberately broken initialize")

    def execute(self, requests):
        return []
"""


def write_model(repo: Path, name: str, source: str) -> Path:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(IDENTITY_CONFIG.format(name=name))
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(source))
    return repo


@pytest.fixture(scope="module")
def backend_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backend-cache")


@pytest.fixture(scope="module")
def identity_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("repo"), "identity", IDENTITY_MODEL)


@pytest.fixture(scope="module")
def identity_server(identity_repo: Path, backend_cache: Path) -> Iterator[TritonServer]:
    with TritonServer(identity_repo, backend_cache_dir=backend_cache) as server:
        yield server


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}


def listening_addresses(port: int) -> set[str]:
    """Hex local addresses (as in /proc/net/tcp{,6}) of the sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(address)
    return found


def shm_regions(prefix: str) -> list[str]:
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix))


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def batch() -> np.ndarray:
    return np.arange(8, dtype=np.float32).reshape(2, 4) * 1.5


def test_server_reports_ready_with_every_endpoint_on_loopback(identity_server: TritonServer) -> None:
    assert identity_server.is_alive() and identity_server.is_ready()
    assert identity_server.model_ready("identity")
    assert not identity_server.model_ready("no_such_model")
    for port in identity_server.ports:
        # 127.0.0.1 in /proc/net/tcp, or its IPv4-mapped form in tcp6 (the metrics server binds that way).
        assert listening_addresses(port) and listening_addresses(port) <= LOOPBACK, f"port {port} not on loopback"


def test_grpc_inference_returns_the_input(identity_server: TritonServer) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(identity_server.grpc_url)
    try:
        inputs = [grpcclient.InferInput("INPUT0", [2, 4], "FP32")]
        inputs[0].set_data_from_numpy(batch())
        result = client.infer("identity", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT0")])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), batch())
    finally:
        client.close()


def test_http_inference_returns_the_input(identity_server: TritonServer) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(identity_server.http_url)
    try:
        inputs = [httpclient.InferInput("INPUT0", [2, 4], "FP32")]
        inputs[0].set_data_from_numpy(batch(), binary_data=True)
        result = client.infer("identity", inputs, outputs=[httpclient.InferRequestedOutput("OUTPUT0")])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), batch())
    finally:
        client.close()


def test_metrics_endpoint_serves_prometheus_text(identity_server: TritonServer) -> None:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(identity_server.metrics_url, timeout=5) as response:
        assert "nv_inference_request_success" in response.read().decode()


def test_stop_removes_this_servers_shm_regions(identity_repo: Path, backend_cache: Path) -> None:
    server = TritonServer(identity_repo, backend_cache_dir=backend_cache).start()
    pid = server.pid
    assert pid is not None
    assert shm_regions(server.shm_prefix), "the python backend should have created shm regions"
    assert len(group_members(pid)) >= 2, "tritonserver and its python stub share one process group"
    server.stop()
    assert not server.is_alive()
    assert group_members(pid) == []
    assert shm_regions(server.shm_prefix) == []


def test_model_failing_to_initialize_makes_start_raise_with_its_error(tmp_path: Path, backend_cache: Path) -> None:
    repo = write_model(tmp_path / "repo", "broken", BROKEN_MODEL)
    server = TritonServer(repo, backend_cache_dir=backend_cache)
    started = time.monotonic()
    with pytest.raises(TritonStartError) as info:
        server.start(timeout=60)
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert "deliberately broken initialize" in message
    assert "exited with code 1" in message
    assert not server.is_alive()
    assert server.pid is not None and group_members(server.pid) == []
    assert shm_regions(server.shm_prefix) == []


def test_killed_server_is_not_alive_and_the_repository_serves_again(identity_repo: Path, backend_cache: Path) -> None:
    crashed = TritonServer(identity_repo, backend_cache_dir=backend_cache).start()
    crashed_pid = crashed.pid
    assert crashed_pid is not None
    crashed.kill()
    assert not crashed.is_alive() and not crashed.is_ready()
    assert crashed.returncode == -9
    assert group_members(crashed_pid) == []
    assert shm_regions(crashed.shm_prefix), "a crash leaves the python backend's regions behind"
    try:
        with TritonServer(identity_repo, backend_cache_dir=backend_cache) as again:
            assert again.model_ready("identity")
            assert again.pid != crashed_pid
    finally:
        crashed.stop()
    assert shm_regions(crashed.shm_prefix) == []


def test_leftover_log_names_the_triton_process(identity_server: TritonServer) -> None:
    log = identity_server.log_path.read_text()
    assert f"--grpc-port={identity_server.ports.grpc}" in log.splitlines()[0]
    assert "successfully loaded 'identity'" in log
    assert os.path.getsize(identity_server.log_path) > 0
