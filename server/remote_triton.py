"""``mofserve serve --triton-url grpc://HOST:PORT``: the front-end alone, before a Triton it does not own.

The split Kubernetes deployment (``deploy/kubernetes/overlays/split``) runs Triton in its own GPU
Deployment (``mofserve triton``) and the front-ends in a stateless, horizontally scaled one. A
front-end then has nothing to export and no process to restart: Triton's pod has its own probes,
and the kubelet restarts it. What stays is readiness, decided by the same ``TritonSupervisor`` as
with a Triton of our own (server/supervisor.py: a real probe inference through every model),
re-probed every ``probe_interval_s`` while ready and every ``health_interval_s`` while not, so a
front-end leaves its Service while the Triton behind it cannot answer and comes back by itself.
``RemoteTriton`` is the supervisor's strategy for that Triton: nothing to start, stop or restart.
"""

from __future__ import annotations

import re

from .supervisor import TritonEndpoints

_URL = re.compile(r"grpc://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})/?")


def parse_triton_url(url: str) -> str:
    """``grpc://HOST:PORT`` -> ``HOST:PORT`` (what tritonclient.grpc wants); errors name the setting."""
    match = _URL.fullmatch(url.strip())
    if not match or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"triton_url: expected grpc://HOST:PORT (Triton's gRPC endpoint, e.g. "
                         f"grpc://mofserve-triton:8001), got {url!r}")
    return f"{match['host']}:{int(match['port'])}"


def check_metrics_url(url: str | None) -> str | None:
    """Triton's metrics page for the ``/metrics/triton`` relay: an ``http(s)://`` URL, or None (no relay)."""
    if url is None or url == "":
        return None
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
        raise ValueError(f"triton_metrics_url: expected http://HOST:PORT/metrics (Triton's metrics port, "
                         f"e.g. http://mofserve-triton:8002/metrics), got {url!r}")
    return url


class RemoteTriton:
    """The ``TritonLifecycle`` of a Triton in another pod: reached, probed, never started or restarted."""

    restartable = False  # its pod restarts it; the supervisor re-dials after a failed probe

    def __init__(self, triton_url: str, metrics_url: str | None) -> None:
        self._endpoints = TritonEndpoints(parse_triton_url(triton_url), check_metrics_url(metrics_url))

    def start(self) -> TritonEndpoints:
        """Nothing to start (Triton runs in another pod): where it is, relayed metrics included
        (``--triton-metrics-url``, or no relay)."""
        return self._endpoints

    def exited(self) -> str | None:
        """Never: the process is not ours to watch; a failed probe is what tells."""
        return None

    def restart(self, kill: bool) -> None:
        """Never called (``restartable`` is False); refused rather than pretended."""
        raise RuntimeError("a remote Triton is restarted by its own pod, not by this front-end")

    def stop(self, timeout: float) -> None:
        """Nothing to stop: the remote Triton outlives this front-end."""
