"""Unit tests for mofserve.server.launcher that need no real tritonserver.

Lifecycle behaviour (readiness wait, start failures, SIGTERM/SIGKILL escalation, process-group
cleanup, port-clash retry) is exercised against a small fake ``tritonserver`` script, so these run
in well under a second each; tests/integration/test_launcher.py covers the real binary.
"""

from __future__ import annotations

import os
import socket
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest

from mofserve.server import launcher, triton_install, triton_resources
from mofserve.server.launcher import TritonServer, TritonStartError
from mofserve.server.triton_install import (
    PYTRITON_REQUIREMENT,
    TritonInstall,
    TritonNotInstalledError,
    find_tritonserver,
    prepare_backend_directory,
    triton_environment,
)
from mofserve.server.triton_resources import cleanup_stale_shm, free_port, free_ports, new_shm_prefix

PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"

FAKE_TRITONSERVER = """\
#!{python}
# A stand-in for tritonserver: parses the flags the launcher passes and mimics the behaviours
# the launcher must handle. FAKE_TRITON_MODE picks one.
import http.server, os, signal, subprocess, sys, time

flags = {{}}
backend_config = {{}}
for arg in sys.argv[1:]:
    key, _, value = arg[2:].partition("=")
    if key == "backend-config":
        name, _, setting = value.partition(",")
        k, _, v = setting.partition("=")
        backend_config[k] = v
    else:
        flags[key] = value
mode = os.environ.get("FAKE_TRITON_MODE", "ready")
print("I0000 00:00:00.000000 1 fake.cc:1] starting fake tritonserver", flush=True)

if mode == "fail":
    print('E0000 00:00:00.000000 1 model_lifecycle.cc:642] "failed to load broken: RuntimeError: boom"')
    for i in range(80):
        print(f"I0000 00:00:00.000000 1 fake.cc:2] filler line {{i}}")
    print("error: creating server: Internal - failed to load all models", flush=True)
    sys.exit(1)

if mode == "clash":
    marker = os.environ["FAKE_CLASH_MARKER"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        print(f"E0000 main.cc:245] \\"failed to start GRPC service: Unavailable - Socket "
              f"'127.0.0.1:{{flags['grpc-port']}}' already in use \\"", flush=True)
        sys.exit(1)

if mode == "hang":
    # A child in the same process group, like a python backend stub; never becomes ready.
    child = subprocess.Popen(["sleep", "300"])
    open(os.environ["FAKE_CHILD_PID_FILE"], "w").write(str(child.pid))
    time.sleep(300)
    sys.exit(0)

if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

shm_dir = os.environ.get("FAKE_SHM_DIR")
if shm_dir:
    open(os.path.join(shm_dir, backend_config["shm-region-prefix-name"] + "region0"), "w").close()

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path in ("/v2/health/ready", "/v2/health/live", "/v2/models/identity/ready")
        self.send_response(200 if ok else 400)
        self.end_headers()
    def log_message(self, *args):
        pass

httpd = http.server.HTTPServer((flags["http-address"], int(flags["http-port"])), Health)
print("I0000 fake.cc:3] Started HTTPService", flush=True)
httpd.serve_forever()
"""


@pytest.fixture
def fake_install(tmp_path: Path) -> TritonInstall:
    """A directory laid out like pytriton/tritonserver, whose binary is FAKE_TRITONSERVER."""
    root = tmp_path / "dist" / "pytriton" / "tritonserver"
    for folder in ("bin", "backends/python", f"python_backend_stubs/{PY_VERSION}", "caches/local"):
        (root / folder).mkdir(parents=True)
    libs = tmp_path / "dist" / "nvidia_pytriton.libs"
    libs.mkdir()
    binary = root / "bin" / "tritonserver"
    binary.write_text(FAKE_TRITONSERVER.format(python=sys.executable))
    binary.chmod(0o755)
    (root / "backends/python/libtriton_python.so").write_bytes(b"so")
    (root / "backends/python/triton_python_backend_utils.py").write_text("# utils\n")
    (root / f"python_backend_stubs/{PY_VERSION}/triton_python_backend_stub").write_bytes(b"stub")
    return TritonInstall(
        root=root,
        binary=binary,
        backend_source_dir=root / "backends" / "python",
        stubs_dir=root / "python_backend_stubs",
        caches_dir=root / "caches",
        libs_dir=libs,
        version="0.0.test",
    )


@pytest.fixture
def shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the launcher's shared-memory folder at a temporary one."""
    directory = tmp_path / "shm"
    directory.mkdir()
    monkeypatch.setattr(triton_resources, "SHM_DIR", directory)
    return directory


def make_server(tmp_path: Path, install: TritonInstall, **kwargs: object) -> TritonServer:
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    kwargs.setdefault("backend_cache_dir", tmp_path / "cache")
    kwargs.setdefault("log_file", tmp_path / "logs" / "triton.log")
    return TritonServer(repo, install=install, **kwargs)  # type: ignore[arg-type]


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists"; treat it as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---- locating the installation ---------------------------------------------------------------


def test_find_tritonserver_locates_the_wheels_binary_and_backend_files() -> None:
    install = find_tritonserver()
    assert install.binary.name == "tritonserver" and os.access(install.binary, os.X_OK)
    assert (install.backend_source_dir / "libtriton_python.so").is_file()
    assert (install.backend_source_dir / "triton_python_backend_utils.py").is_file()
    assert install.stub_path().is_file()
    assert (install.caches_dir / "local" / "libtritoncache_local.so").is_file()
    assert any(install.libs_dir.glob("libcudart*.so*"))


def test_find_tritonserver_names_the_wheel_when_pytriton_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_install.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TritonNotInstalledError, match=PYTRITON_REQUIREMENT):
        find_tritonserver()


# ---- backend directory -------------------------------------------------------------------------


def test_backend_directory_links_backend_utils_and_the_stub_for_this_python(
    tmp_path: Path, fake_install: TritonInstall
) -> None:
    backend_dir = prepare_backend_directory(tmp_path / "cache", fake_install)
    python_dir = backend_dir / "python"
    assert (python_dir / "libtriton_python.so").read_bytes() == b"so"
    assert (python_dir / "triton_python_backend_utils.py").read_text() == "# utils\n"
    assert (python_dir / "triton_python_backend_stub").read_bytes() == b"stub"
    assert (python_dir / "triton_python_backend_stub").resolve() == fake_install.stub_path().resolve()
    assert backend_dir.name != "triton"  # would shadow the `triton` package torch imports


def test_backend_directory_is_reused_on_second_call(tmp_path: Path, fake_install: TritonInstall) -> None:
    first = prepare_backend_directory(tmp_path / "cache", fake_install)
    marker = first / "python" / "marker"
    marker.write_text("kept")
    assert prepare_backend_directory(tmp_path / "cache", fake_install) == first
    assert marker.read_text() == "kept"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no temp dirs left


def test_backend_directory_survives_concurrent_preparation(tmp_path: Path, fake_install: TritonInstall) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def prepare() -> None:
        barrier.wait()
        try:
            results.append(prepare_backend_directory(tmp_path / "cache", fake_install))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(results)) == 1
    assert (results[0] / "python" / "triton_python_backend_stub").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [results[0].name]


def test_backend_directory_with_dangling_links_is_rebuilt(tmp_path: Path, fake_install: TritonInstall) -> None:
    backend_dir = prepare_backend_directory(tmp_path / "cache", fake_install)
    stub_link = backend_dir / "python" / "triton_python_backend_stub"
    stub_link.unlink()
    stub_link.symlink_to(tmp_path / "gone")
    assert prepare_backend_directory(tmp_path / "cache", fake_install) == backend_dir
    assert stub_link.read_bytes() == b"stub"


def test_backend_directory_reports_a_missing_stub_for_this_python(tmp_path: Path, fake_install: TritonInstall) -> None:
    fake_install.stub_path().unlink()
    with pytest.raises(TritonNotInstalledError, match=f"no python backend stub for Python {PY_VERSION}"):
        prepare_backend_directory(tmp_path / "cache", fake_install)


# ---- ports, environment, shm -------------------------------------------------------------------


def test_free_port_can_be_bound_on_loopback() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_free_ports_are_distinct() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3


def test_environment_puts_venv_bin_first_and_adds_triton_libs(fake_install: TritonInstall) -> None:
    env = triton_environment(fake_install, {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/opt/x", "FOO": "1"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["PATH"].endswith("/usr/bin:/bin")
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert libs[0] == str(fake_install.libs_dir)
    assert str(sysconfig.get_config_var("LIBDIR")) in libs
    assert libs[-1] == "/opt/x"
    assert env["FOO"] == "1"


def test_environment_makes_openmp_pools_spin_briefly_unless_the_user_chose(
        fake_install: TritonInstall, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    env = triton_environment(fake_install)
    assert (env["OMP_WAIT_POLICY"], env["GOMP_SPINCOUNT"]) == ("PASSIVE", "20000")
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    assert triton_environment(fake_install)["GOMP_SPINCOUNT"] == "0"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert triton_environment(fake_install)["OMP_WAIT_POLICY"] == "ACTIVE"
    assert triton_environment(fake_install, {"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"


def test_shm_prefixes_are_unique_and_carry_the_pid() -> None:
    prefixes = {new_shm_prefix() for _ in range(50)}
    assert len(prefixes) == 50
    assert all(p.startswith(f"mofserve_{os.getpid()}_") and p.endswith("_") for p in prefixes)


def test_cleanup_stale_shm_removes_only_regions_with_the_prefix(shm_dir: Path) -> None:
    for name in ("mofserve_1_aa_x", "mofserve_1_aa_y", "mofserve_1_ab_x", "triton_python_backend_shm_region_1"):
        (shm_dir / name).write_bytes(b"")
    removed = cleanup_stale_shm("mofserve_1_aa_")
    assert sorted(p.name for p in removed) == ["mofserve_1_aa_x", "mofserve_1_aa_y"]
    assert sorted(p.name for p in shm_dir.iterdir()) == ["mofserve_1_ab_x", "triton_python_backend_shm_region_1"]


@pytest.mark.parametrize("prefix", ["", "a/b", ".."])
def test_cleanup_stale_shm_refuses_prefixes_that_match_too_much(prefix: str) -> None:
    with pytest.raises(ValueError):
        cleanup_stale_shm(prefix)


# ---- command line ------------------------------------------------------------------------------


def test_command_line_pins_mode_readiness_and_binds_every_endpoint_to_host(
    tmp_path: Path, fake_install: TritonInstall
) -> None:
    server = make_server(tmp_path, fake_install, http_port=18000, grpc_port=18001, metrics_port=18002)
    command = server.build_command()
    assert command[0] == str(fake_install.binary)
    for flag in (
        f"--model-repository={tmp_path / 'repo'}",
        "--model-control-mode=none",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--allow-gpu-metrics=false",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        "--http-port=18000",
        "--grpc-port=18001",
        "--metrics-port=18002",
        f"--backend-config=python,shm-region-prefix-name={server.shm_prefix}",
        f"--backend-config=python,shm-default-byte-size={16 * 1024 * 1024}",
        "--log-verbose=0",
    ):
        assert flag in command
    backend_flag = next(arg for arg in command if arg.startswith("--backend-directory="))
    assert (Path(backend_flag.partition("=")[2]) / "python" / "triton_python_backend_stub").exists()


def test_command_line_enables_the_local_response_cache_with_its_size(
    tmp_path: Path, fake_install: TritonInstall
) -> None:
    command = make_server(tmp_path, fake_install, response_cache_bytes=1234).build_command()
    assert f"--cache-directory={fake_install.caches_dir}" in command
    assert "--cache-config=local,size=1234" in command


def test_zero_response_cache_leaves_the_cache_flags_out(tmp_path: Path, fake_install: TritonInstall) -> None:
    command = make_server(tmp_path, fake_install, response_cache_bytes=0).build_command()
    assert not any(arg.startswith(("--cache-directory", "--cache-config")) for arg in command)


def test_extra_args_come_last_and_verbosity_is_passed(tmp_path: Path, fake_install: TritonInstall) -> None:
    command = make_server(
        tmp_path, fake_install, log_verbose=2, extra_args=["--exit-timeout-secs=5", "--id=x"]
    ).build_command()
    assert command[-2:] == ["--exit-timeout-secs=5", "--id=x"]
    assert "--log-verbose=2" in command


def test_unset_ports_are_picked_free_and_distinct(tmp_path: Path, fake_install: TritonInstall) -> None:
    server = make_server(tmp_path, fake_install, grpc_port=18001)
    assert server.ports.grpc == 18001
    assert len(set(server.ports)) == 3


def test_urls_are_in_the_form_tritonclient_expects(tmp_path: Path, fake_install: TritonInstall) -> None:
    server = make_server(tmp_path, fake_install, http_port=18000, grpc_port=18001, metrics_port=18002)
    assert server.http_url == "127.0.0.1:18000"
    assert server.grpc_url == "127.0.0.1:18001"
    assert server.metrics_url == "http://127.0.0.1:18002/metrics"


def test_default_log_file_is_a_file_per_server_in_a_temp_dir(fake_install: TritonInstall, tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    a = TritonServer(tmp_path / "repo", install=fake_install, backend_cache_dir=tmp_path / "cache")
    b = TritonServer(tmp_path / "repo", install=fake_install, backend_cache_dir=tmp_path / "cache")
    assert a.log_path != b.log_path
    assert a.log_path.parent.is_dir()


# ---- lifecycle against the fake binary ---------------------------------------------------------


def test_start_waits_until_ready_and_stop_ends_the_process_and_its_shm(
    tmp_path: Path, fake_install: TritonInstall, shm_dir: Path
) -> None:
    server = make_server(tmp_path, fake_install, env={"FAKE_SHM_DIR": str(shm_dir)})
    with server:
        assert server.is_alive() and server.is_ready() and server.model_ready("identity")
        assert not server.model_ready("missing")
        assert [p.name for p in shm_dir.iterdir()] == [server.shm_prefix + "region0"]
        pid = server.pid
        assert pid is not None
    assert not server.is_alive() and not pid_exists(pid)
    assert list(shm_dir.iterdir()) == []
    assert server not in launcher._LIVE_SERVERS
    server.stop()  # idempotent


def test_stop_on_a_server_that_never_started_is_a_no_op(tmp_path: Path, fake_install: TritonInstall) -> None:
    server = make_server(tmp_path, fake_install)
    server.stop()
    assert not server.is_alive() and server.pid is None


def test_start_failure_quotes_the_log_including_earlier_error_lines(
    tmp_path: Path, fake_install: TritonInstall
) -> None:
    server = make_server(tmp_path, fake_install, env={"FAKE_TRITON_MODE": "fail"})
    started = time.monotonic()
    with pytest.raises(TritonStartError) as info:
        server.start(timeout=30)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "exited with code 1" in message
    assert "failed to load all models" in message  # in the tail
    assert "RuntimeError: boom" in message  # an error line that scrolled out of the tail
    assert "filler line 79" in message and "filler line 10 " not in message
    assert not server.is_alive()


def test_start_timeout_stops_the_whole_process_group(tmp_path: Path, fake_install: TritonInstall) -> None:
    child_pid_file = tmp_path / "child.pid"
    server = make_server(
        tmp_path, fake_install, env={"FAKE_TRITON_MODE": "hang", "FAKE_CHILD_PID_FILE": str(child_pid_file)}
    )
    started = time.monotonic()
    with pytest.raises(TritonStartError, match="not ready after"):
        server.start(timeout=1.5)
    assert time.monotonic() - started < 10
    assert server.pid is not None and not pid_exists(server.pid)
    assert not pid_exists(int(child_pid_file.read_text()))


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path, fake_install: TritonInstall) -> None:
    server = make_server(tmp_path, fake_install, env={"FAKE_TRITON_MODE": "stubborn"}).start(timeout=30)
    started = time.monotonic()
    server.stop(timeout=0.5)
    assert time.monotonic() - started < 5
    assert not server.is_alive()


def test_kill_leaves_shm_until_stop_and_the_server_can_start_again(
    tmp_path: Path, fake_install: TritonInstall, shm_dir: Path
) -> None:
    server = make_server(tmp_path, fake_install, env={"FAKE_SHM_DIR": str(shm_dir)}).start(timeout=30)
    server.kill()
    assert not server.is_alive()
    assert [p.name for p in shm_dir.iterdir()] == [server.shm_prefix + "region0"]  # as a crash would
    server.stop()
    assert list(shm_dir.iterdir()) == []
    server.start(timeout=30)
    try:
        assert server.is_ready()
    finally:
        server.stop()


def test_start_retries_with_fresh_ports_when_a_picked_port_is_taken(
    tmp_path: Path, fake_install: TritonInstall
) -> None:
    server = make_server(
        tmp_path,
        fake_install,
        env={"FAKE_TRITON_MODE": "clash", "FAKE_CLASH_MARKER": str(tmp_path / "clashed")},
    )
    first_ports = server.ports
    with server:
        assert server.is_ready()
        assert server.ports != first_ports
    assert "already in use" in server.log_path.read_text()  # the log keeps both attempts


def test_fixed_ports_are_not_retried_on_a_clash(tmp_path: Path, fake_install: TritonInstall) -> None:
    server = make_server(
        tmp_path,
        fake_install,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        env={"FAKE_TRITON_MODE": "clash", "FAKE_CLASH_MARKER": str(tmp_path / "clashed")},
    )
    with pytest.raises(TritonStartError, match="already in use"):
        server.start(timeout=30)


def test_starting_a_running_server_again_is_refused(tmp_path: Path, fake_install: TritonInstall) -> None:
    with make_server(tmp_path, fake_install) as server, pytest.raises(RuntimeError, match="already running"):
        server.start()


def test_atexit_hook_stops_servers_left_running(tmp_path: Path, fake_install: TritonInstall) -> None:
    server = make_server(tmp_path, fake_install).start(timeout=30)
    pid = server.pid
    assert pid is not None and server in launcher._LIVE_SERVERS
    launcher._stop_live_servers()
    assert not pid_exists(pid)
    assert server not in launcher._LIVE_SERVERS


def test_log_of_a_restarted_server_appends_and_failure_quotes_only_this_run(
    tmp_path: Path, fake_install: TritonInstall
) -> None:
    log = tmp_path / "logs" / "triton.log"
    log.parent.mkdir()
    log.write_text("E0000 old.cc:1] stale error from an earlier run\n")
    server = make_server(tmp_path, fake_install, log_file=log, env={"FAKE_TRITON_MODE": "fail"})
    with pytest.raises(TritonStartError) as info:
        server.start(timeout=30)
    assert "stale error" not in str(info.value)
    assert log.read_text().startswith("E0000 old.cc:1] stale error")
