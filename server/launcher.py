"""Start and stop the real ``tritonserver`` binary that ships inside the ``nvidia-pytriton`` wheel.

Why this module exists instead of ``pytriton.triton.Triton``: pytriton binds Python callables to
models, whereas mofserve serves a plain Triton *model repository* (python-backend and ONNX models).
So we only borrow pytriton's binaries and run ``tritonserver`` ourselves, which needs a handful of
non-obvious pieces. Finding the installation (the wheel's, or a full one named by
``MOFSERVE_TRITONSERVER_ROOT``), preparing its backend directory and the environment its python
backend stubs need live in :mod:`mofserve.server.triton_install`; this module owns the process:

* process-group handling so that ``stop()`` also takes down the per-model stub processes, and a
  per-server shared-memory prefix so that ``stop()`` deletes exactly this server's ``/dev/shm``
  regions (a killed server leaves them behind and ``/dev/shm`` is a small tmpfs);
* an ``atexit`` hook so that an exception or a failing test never leaves a server running.

All endpoints bind to loopback by default: the server is reached through mofserve's own front
end, never directly from the network.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from .triton_install import (
    TritonInstall,
    default_cache_root,
    find_tritonserver,
    prepare_backend_directory,
    triton_environment,
)
from .triton_resources import TritonPorts, cleanup_stale_shm, free_ports, new_shm_prefix

__all__ = [
    "DEFAULT_PYTHON_SHM_BYTES",
    "DEFAULT_RESPONSE_CACHE_BYTES",
    "TritonServer",
    "TritonStartError",
]

LOGGER = logging.getLogger(__name__)

DEFAULT_RESPONSE_CACHE_BYTES = 64 * 1024 * 1024
DEFAULT_PYTHON_SHM_BYTES = 16 * 1024 * 1024

#: How many lines of Triton's log a start failure quotes.
LOG_TAIL_LINES = 40

# Triton logs these on every CPU-only start; they are noise, not the reason a start failed.
_HARMLESS_ERROR_MARKERS = (
    "CudaDriverHelper has not been initialized",
    "unable to create stream for ensemble",
    "CUDA driver version is insufficient",
)
_ERROR_LINE = re.compile(r"^E\d{4} ")
_PORT_IN_USE_MARKERS = ("already in use", "Address already in use")


class TritonStartError(RuntimeError):
    """``tritonserver`` exited or did not become ready in time; the message quotes its log."""


def _read_log_tail(path: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> tuple[list[str], list[str]]:
    """(last ``lines`` lines, error lines) of ``path`` from byte ``offset`` on.

    Reads at most the last 1 MiB: enough for any tail, bounded for a chatty verbose log.
    """
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = max(offset, size - (1 << 20))
            handle.seek(start)
            text = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return [], []
    all_lines = text.splitlines()
    errors = [
        line
        for line in all_lines
        if _ERROR_LINE.match(line) and not any(marker in line for marker in _HARMLESS_ERROR_MARKERS)
    ]
    return all_lines[-lines:], errors


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Loopback health checks must never go through an HTTP proxy set in the environment.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_status(url: str, timeout: float) -> int | None:
    """HTTP status of ``GET url``, or None when nothing answered."""
    try:
        with _NO_PROXY_OPENER.open(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

_LIVE_SERVERS: set[TritonServer] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_live_servers() -> None:
    """Last line of defence: never let an exception or a failed test leave Triton running."""
    with _LIVE_LOCK:
        servers = list(_LIVE_SERVERS)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout=5.0)


class TritonServer:
    """One ``tritonserver`` process serving a model repository; a context manager.

    ``with TritonServer(repo) as server:`` starts it, waits until every model is ready, and stops
    it (process group and shared memory) on exit. Ports left as ``None`` are picked free ports.
    """

    def __init__(
        self,
        model_repository: Path,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        response_cache_bytes: int = DEFAULT_RESPONSE_CACHE_BYTES,
        python_shm_bytes: int = DEFAULT_PYTHON_SHM_BYTES,
        log_file: Path | None = None,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        install: TritonInstall | None = None,
        backend_cache_dir: Path | None = None,
    ) -> None:
        """Describe the server; nothing is spawned until :meth:`start`.

        Args:
            model_repository: folder passed as ``--model-repository``.
            host: address all three endpoints bind to; loopback by default on purpose.
            http_port, grpc_port, metrics_port: fixed ports, or None to pick free ones.
            response_cache_bytes: size of Triton's local response cache; 0 leaves the cache flags
                out (models opt in with ``response_cache { enable: true }``).
            python_shm_bytes: default size of each python-backend shm region.
            log_file: where Triton's stdout+stderr go (appended). Default: a fresh file under
                ``<tmp>/mofserve-logs``. Never a pipe: an unread pipe fills up and blocks Triton.
            log_verbose: ``--log-verbose`` level.
            extra_args: appended last to the command line.
            env: variables added to (overriding) ``os.environ`` for the process.
            install: the Triton distribution; default :func:`find_tritonserver`.
            backend_cache_dir: where the backend directory is prepared; default
                :func:`default_cache_root`.
        """
        if response_cache_bytes < 0 or python_shm_bytes <= 0:
            raise ValueError("response_cache_bytes must be >= 0 and python_shm_bytes > 0")
        self.model_repository = Path(model_repository).absolute()  # the stubs get paths from it
        self.host = host
        self.response_cache_bytes = response_cache_bytes
        self.python_shm_bytes = python_shm_bytes
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.env = dict(env) if env else {}
        self.install = install or find_tritonserver()
        self.backend_cache_dir = Path(backend_cache_dir) if backend_cache_dir else default_cache_root()
        self.shm_prefix = new_shm_prefix()
        self._fixed_ports = TritonPorts(http_port or 0, grpc_port or 0, metrics_port or 0)
        self._ports = self._pick_ports()
        if log_file is None:
            log_dir = Path(tempfile.gettempdir()) / "mofserve-logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            log_file = log_dir / f"tritonserver-{self.shm_prefix.rstrip('_')}.log"
        self._log_path = Path(log_file)
        self._log_offset = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._exit_status: int | None = None
        self._lock = threading.RLock()

    # ---- addresses -------------------------------------------------------------------------

    def _pick_ports(self) -> TritonPorts:
        fresh = iter(free_ports(sum(1 for port in self._fixed_ports if not port), self.host))
        return TritonPorts(*(port or next(fresh) for port in self._fixed_ports))

    @property
    def ports(self) -> TritonPorts:
        """The (http, grpc, metrics) ports; chosen at construction, re-chosen only on a port clash."""
        return self._ports

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint, without scheme, as ``tritonclient.http`` expects."""
        return _host_port(self.host, self._ports.http)

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint, as ``tritonclient.grpc`` expects."""
        return _host_port(self.host, self._ports.grpc)

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus metrics page."""
        return f"http://{_host_port(self.host, self._ports.metrics)}/metrics"

    @property
    def pid(self) -> int | None:
        """Process id of ``tritonserver`` (also its process-group id), or None if never started."""
        return self._process.pid if self._process is not None else None

    @property
    def log_path(self) -> Path:
        """File holding Triton's stdout and stderr."""
        return self._log_path

    # ---- command line ----------------------------------------------------------------------

    def backend_directory(self) -> Path:
        """The prepared ``--backend-directory`` (built on first use, then reused), or a full
        installation's own ``backends/``."""
        if self.install.backends_dir is not None:
            return self.install.backends_dir
        return prepare_backend_directory(self.backend_cache_dir, self.install)

    def build_command(self) -> list[str]:
        """The full ``tritonserver`` command line for the current ports."""
        ports = self._ports
        command = [
            str(self.install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.backend_directory()}",
            # The repository is fixed at start: no load/unload API, every model loads at start.
            "--model-control-mode=none",
            # "ready" means every model is ready, so start() returning means servable.
            "--strict-readiness=true",
            # A model that fails to load fails the start, instead of a half-working server.
            "--exit-on-error=true",
            # No GPU metrics: DCGM is absent on CPU hosts and this avoids its startup noise.
            "--allow-gpu-metrics=false",
            f"--http-address={self.host}",
            f"--http-port={ports.http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={ports.grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={ports.metrics}",
            f"--backend-config=python,shm-default-byte-size={self.python_shm_bytes}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.response_cache_bytes > 0:
            command += [
                f"--cache-directory={self.install.caches_dir}",
                f"--cache-config=local,size={self.response_cache_bytes}",
            ]
        command += self.extra_args
        return command

    def environment(self) -> dict[str, str]:
        """The environment the process runs with (see :func:`triton_environment`)."""
        return triton_environment(self.install, self.env)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> Self:
        """Spawn ``tritonserver`` and wait until ``/v2/health/ready`` answers 200.

        The process gets its own session (and so process group) so that ``stop()`` can signal it
        together with the python-backend stubs it forks. If a picked port was taken in the
        meantime, the start is retried with fresh ports (at most twice).

        Raises:
            TritonStartError: the process exited or was not ready within ``timeout`` seconds; it
                has been stopped and the message quotes the end of its log.
        """
        deadline = time.monotonic() + timeout
        attempts = 3 if 0 in self._fixed_ports else 1
        for attempt in range(1, attempts + 1):
            self._spawn()
            try:
                self.wait_ready(max(0.0, deadline - time.monotonic()))
                return self
            except BaseException as exc:
                self.stop()
                if not isinstance(exc, TritonStartError):
                    raise  # KeyboardInterrupt and friends: stopped, now propagate
                tail, _ = _read_log_tail(self._log_path, self._log_offset)
                port_clash = any(marker in line for line in tail for marker in _PORT_IN_USE_MARKERS)
                if port_clash and attempt < attempts and time.monotonic() < deadline:
                    LOGGER.warning("tritonserver port clash on %s; retrying with fresh ports", self._ports)
                    self._ports = self._pick_ports()
                    self.shm_prefix = new_shm_prefix()
                    continue
                raise TritonStartError(self._failure_message(exc.args[0] if exc.args else "")) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self) -> None:
        with self._lock:
            if self._process is not None and self.is_alive():
                raise RuntimeError(f"tritonserver is already running (pid {self._process.pid})")
            self.stop()  # reap a previous run that exited on its own, and free its shm regions
            command = self.build_command()
            env = self.environment()
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            self._exit_status = None
            with self._log_path.open("ab") as log:
                self._log_offset = log.tell()
                log.write(f"# mofserve: {' '.join(command)}\n".encode())
                log.flush()
                # The child gets its own dup of the descriptor; ours closes when this block ends.
                self._process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            with _LIVE_LOCK:
                _LIVE_SERVERS.add(self)
            LOGGER.info("started tritonserver pid %s on %s (log %s)", self.pid, self.ports, self._log_path)

    def wait_ready(self, timeout: float) -> Self:
        """Block until the server reports ready.

        Raises:
            TritonStartError: the process exited, or ``timeout`` seconds passed (the process is
                left running; :meth:`start` stops it).
        """
        deadline = time.monotonic() + timeout
        ready_url = f"http://{self.http_url}/v2/health/ready"
        while True:
            if not self.is_alive():
                code = self.returncode
                raise TritonStartError(f"tritonserver exited with code {code} before becoming ready")
            remaining = deadline - time.monotonic()
            if _http_status(ready_url, timeout=max(0.05, min(1.0, remaining))) == 200:
                return self
            if time.monotonic() >= deadline:
                raise TritonStartError(f"tritonserver was not ready after {timeout:.1f} s")
            time.sleep(0.1)

    def _failure_message(self, reason: str) -> str:
        tail, errors = _read_log_tail(self._log_path, self._log_offset)
        parts = [f"{reason} (pid {self.pid}, ports {tuple(self._ports)}, log {self._log_path})"]
        shown = set(tail)
        extra_errors = [line[:2000] for line in errors if line not in shown][:20]
        if extra_errors:
            parts += ["--- error lines from the log ---", *extra_errors]
        parts += [f"--- last {len(tail)} lines of the log ---", *tail]
        return "\n".join(parts)

    def _leader_exited(self) -> bool:
        """Whether the main process has exited, *without reaping it*.

        Keeping the exited leader as a zombie until ``stop()`` keeps its pid reserved as the
        process-group id, so signalling the group can never hit an unrelated process.
        """
        process = self._process
        if process is None or process.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped elsewhere
            return True
        if info is None:
            return False
        # Same convention as Popen.returncode: negative for "killed by signal".
        killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
        self._exit_status = -info.si_status if killed else info.si_status
        return True

    @property
    def returncode(self) -> int | None:
        """Exit status of the last run (negative: killed by that signal); None while running."""
        if self._process is None or self._process.returncode is not None:
            return self._process.returncode if self._process is not None else None
        return self._exit_status if self._leader_exited() else None

    def is_alive(self) -> bool:
        """Whether the ``tritonserver`` process is running (ready or not)."""
        return not self._leader_exited()

    def _url_ok(self, path: str, timeout: float) -> bool:
        return self.is_alive() and _http_status(f"http://{self.http_url}{path}", timeout) == 200

    def is_ready(self, timeout: float = 1.0) -> bool:
        """Whether the server answers ``/v2/health/ready`` with 200 (all models ready)."""
        return self._url_ok("/v2/health/ready", timeout)

    def is_live(self, timeout: float = 1.0) -> bool:
        """Whether the server answers ``/v2/health/live`` with 200."""
        return self._url_ok("/v2/health/live", timeout)

    def model_ready(self, name: str, version: str | None = None, timeout: float = 1.0) -> bool:
        """Whether model ``name`` (optionally one ``version``) is loaded and ready."""
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/ready"
        return self._url_ok(path, timeout)

    def _signal_group(self, signum: int) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return  # reaped: the pid may belong to someone else now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)

    def _wait_leader(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._leader_exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server: SIGTERM the group, wait ``timeout`` s, then SIGKILL; free its shm.

        Triton answers SIGTERM by draining in-flight requests and unloading models (about 2 s
        here). Stub processes still alive afterwards are killed with the group. Idempotent, and
        safe on a server that never started or that was :meth:`kill`-ed.
        """
        with self._lock:
            process = self._process
            if process is not None and process.returncode is None:
                if not self._leader_exited():
                    self._signal_group(signal.SIGTERM)
                    if not self._wait_leader(timeout):
                        LOGGER.warning("tritonserver pid %s ignored SIGTERM for %.1f s", process.pid, timeout)
                # The leader is gone (or a zombie keeping the group id): kill stragglers, then reap.
                self._signal_group(signal.SIGKILL)
                process.wait()
            cleanup_stale_shm(self.shm_prefix)
            with _LIVE_LOCK:
                _LIVE_SERVERS.discard(self)

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would; shm regions are left behind.

        For fault-injection tests. A later :meth:`stop` (or the ``atexit`` hook) removes the
        regions.
        """
        with self._lock:
            process = self._process
            if process is None or process.returncode is not None:
                return
            self._signal_group(signal.SIGKILL)
            process.wait()

    # ---- context manager -------------------------------------------------------------------

    def __enter__(self) -> Self:
        if not self.is_alive():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "alive" if self._process is not None and self.is_alive() else "stopped"
        return f"TritonServer({str(self.model_repository)!r}, pid={self.pid}, ports={tuple(self._ports)}, {state})"


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """In the forked child, before exec: the kernel sends tritonserver SIGKILL when the thread that
    started it exits, so a front-end that is killed (SIGKILL, OOM) leaves no orphan Triton and its
    python stubs behind holding the CPU, memory or a GPU (found here: e2e fixtures that SIGKILL
    ``mofserve serve`` left a ready Triton + 10 stubs, ~1.3 GB, per fixture). Triton's own process
    group (``start_new_session``) keeps it out of the terminal's Ctrl-C; the supervisor stops it
    cleanly first. The "parent" is the starting *thread*: the serve app starts and restarts Triton
    in its event loop's default executor, whose threads live as long as the loop. Linux only; a
    no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # lazy: only in the forked child, on Linux

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
