"""``mofserve serve --triton-url grpc://HOST:PORT``: the front-end alone, before a Triton it does not own.

The split Kubernetes deployment (``deploy/kubernetes/overlays/split``) runs Triton in its own GPU
Deployment (``mofserve triton``) and the front-ends in a stateless, horizontally scaled one. A
front-end then has nothing to export and no process to restart: Triton's pod has its own probes,
and the kubelet restarts it. What stays is readiness, decided the same way as with a supervised
Triton (``TritonSupervisor.check``: a real probe inference through every model, server/probe.py),
re-probed every ``probe_interval_s`` while ready and every ``health_interval_s`` while not, so a
front-end leaves its Service while the Triton behind it cannot answer and comes back by itself.
"""

from __future__ import annotations

import asyncio
import re

from .app import TritonSupervisor

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


class RemoteTriton(TritonSupervisor):
    """A supervisor without a process: same readiness verdict and ``check``, no export, no restarts."""

    remote = True  # MofServeApp relays ``metrics_url`` (``--triton-metrics-url``) at /metrics/triton

    def __init__(self, triton_url: str, metrics_url: str | None, config, on_change, log) -> None:
        super().__init__(None, config, on_change, log)
        self.grpc_url = parse_triton_url(triton_url)
        self.metrics_url = check_metrics_url(metrics_url)

    def start(self) -> RemoteTriton:
        """Nothing to start (Triton runs in another pod); ``grpc_url`` / ``metrics_url`` are the endpoints."""
        return self

    async def watch(self, stopping: asyncio.Event, engine) -> None:
        """Re-probe until stopped; a failed probe marks the front-end not ready, never restarts anything."""
        c = self.config
        while not stopping.is_set():
            ready = self.readiness.ready
            interval = c.probe_interval_s if ready and c.probe_interval_s > 0 else c.health_interval_s
            try:
                await asyncio.wait_for(stopping.wait(), interval)
                return
            except TimeoutError:
                pass
            if ready and c.probe_interval_s <= 0:
                continue
            if not await self.check(engine):
                await engine.reconnect()  # a Triton pod replaced behind the Service: a fresh channel

    def stop(self, timeout: float = 20.0) -> None:
        """Nothing to stop: the remote Triton outlives this front-end."""
