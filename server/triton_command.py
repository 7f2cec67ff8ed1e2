"""``mofserve triton``: export if needed, then run Triton alone in the foreground.

The Triton Deployment of the split Kubernetes layout (``deploy/kubernetes/overlays/split``) runs
this; its front-ends run ``mofserve serve --triton-url``. Unlike ``serve``, nothing supervises
Triton here: when it exits, this command exits with its code and the kubelet restarts the pod.
Model control stays ``none`` (the repository is fixed at start, as in ``serve``).

Triton has no authentication of its own. The default address is loopback; binding the pod IP
(``--host 0.0.0.0``) is what the split layout needs, and it is only safe behind the NetworkPolicy
that lets the front-end pods alone reach these ports (docs/deployment.md).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

from mofserve.core.profiles import Profile

from .launcher import TritonServer

LOOPBACK = ("127.0.0.1", "::1", "localhost")
Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    print(f"[triton] {message}", file=sys.stderr, flush=True)


def run_triton(profile: Profile, target: str = "cpu", host: str = "127.0.0.1", http_port: int = 8000,
               grpc_port: int = 8001, metrics_port: int = 8002, start_timeout_s: float = 600.0,
               stop: threading.Event | None = None, log: Log = stderr_log) -> int:
    """Serve ``profile`` for ``target`` until SIGTERM/SIGINT (or ``stop``); Triton's exit code if it died."""
    from mofserve.export.pipeline import export_profile

    for name, port in (("http_port", http_port), ("grpc_port", grpc_port), ("metrics_port", metrics_port)):
        if not 0 <= port < 65536:
            raise ValueError(f"{name}: expected 0..65535 (0: a free port), got {port}")
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    if host not in LOOPBACK:
        log(f"binding {host}: Triton has no authentication; expose it only to the front-ends "
            "(the split layout's NetworkPolicy)")
    built = export_profile(profile, target=target, log=log)
    server = TritonServer(built.path, host=host, http_port=http_port or None, grpc_port=grpc_port or None,
                          metrics_port=metrics_port or None)
    server.start(timeout=start_timeout_s)
    try:
        log(f"Triton ready ({profile.name}, {target}); log {server.log_path}")
        print(f"READY triton grpc=grpc://{server.grpc_url} http=http://{server.http_url} "
              f"metrics={server.metrics_url}", flush=True)
        while not stop.wait(1.0):
            if not server.is_alive():
                log(f"tritonserver exited with code {server.returncode}; see {server.log_path}")
                return server.returncode or 1
        log("stopping")
        return 0
    finally:
        server.stop()
