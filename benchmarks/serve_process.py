"""``mofserve serve`` in a child process for a benchmark (``bench load --serve``, ``bench
perf-analyzer --serve``, ``mofserve soak``): started on free loopback ports, waited for until its
``READY`` line, stopped with SIGTERM; and the addresses its log gives (Triton's gRPC and metrics).
"""

from __future__ import annotations

import sys
from pathlib import Path


def parse_ready(line: str) -> dict[str, str] | None:
    """``READY grpc=HOST:PORT http=http://HOST:PORT`` (``mofserve serve``) -> {"grpc": url, "http": url}."""
    if not line.startswith("READY "):
        return None
    fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
    if "grpc" not in fields or "http" not in fields:
        return None
    grpc_url = fields["grpc"] if "://" in fields["grpc"] else "grpc://" + fields["grpc"]
    return {"grpc": grpc_url, "http": fields["http"]}


def triton_metrics_url(log: str) -> str | None:
    """The Triton metrics URL that ``mofserve serve`` logs at start-up (``Triton metrics http://...``)."""
    import re

    found = re.findall(r"Triton metrics (http://\S+)", log)
    return found[-1] if found else None


def triton_grpc_address(log: str) -> str | None:
    """Triton's gRPC HOST:PORT that ``mofserve serve`` logs at start-up (``Triton gRPC HOST:PORT,``)."""
    import re

    found = re.findall(r"Triton gRPC ([^\s,]+)", log)
    return found[-1] if found else None


class ServeProcess:
    """``mofserve serve --profile P`` on free loopback ports in a child process: started, waited for
    until its ``READY`` line, stopped with SIGTERM (then SIGKILL after ``stop_timeout_s``). Its
    stderr goes to ``log_path``. The benchmark never imports the server."""

    def __init__(self, profile: str, log_path: Path, startup_timeout_s: float = 1800.0,
                 stop_timeout_s: float = 60.0) -> None:
        self.profile, self.log_path = profile, Path(log_path)
        self.startup_timeout_s, self.stop_timeout_s = startup_timeout_s, stop_timeout_s
        self.process = None
        self.endpoints: dict[str, str] | None = None
        self.triton_metrics: str | None = None
        self.triton_grpc: str | None = None

    def __enter__(self) -> ServeProcess:
        import subprocess
        import threading

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mofserve", "serve", "--profile", self.profile, "--host", "127.0.0.1",
             "--grpc-port", "0", "--http-port", "0"],
            stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
        ready = threading.Event()

        def read() -> None:  # keeps draining stdout so that the server never blocks on it
            for line in self.process.stdout:
                self._log.write(line)
                self._log.flush()
                found = parse_ready(line.strip())
                if found and self.endpoints is None:
                    self.endpoints = found
                    ready.set()
            ready.set()

        threading.Thread(target=read, name="serve-stdout", daemon=True).start()
        print(f"[load] starting mofserve serve --profile {self.profile} (log {self.log_path})", file=sys.stderr,
              flush=True)
        if not ready.wait(self.startup_timeout_s) or self.endpoints is None:
            self.__exit__(None, None, None)
            raise RuntimeError(f"mofserve serve --profile {self.profile} did not get ready "
                               f"(exit code {self.process.returncode}); see {self.log_path}")
        log_text = self.log_path.read_text(errors="replace")
        self.triton_metrics = triton_metrics_url(log_text)
        self.triton_grpc = triton_grpc_address(log_text)
        print(f"[load] server ready: {self.endpoints['grpc']} {self.endpoints['http']} (Triton metrics "
              f"{self.triton_metrics})", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        import subprocess

        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
