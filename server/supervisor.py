"""Triton's supervision and the service's readiness: one policy for the three ways Triton runs.

``mofserve serve`` runs Triton as its child, ``mofserve triton`` (the Triton pod of the split
deployment) runs it alone in the foreground, and ``mofserve serve --triton-url`` reaches one in
another pod. All three decide readiness the same way, by a real probe inference
(``server/probe.py``: Triton says ready while a python-backend stub is dead), so the policy lives
here once, in ``TritonSupervisor``. What differs is a small strategy, ``TritonLifecycle``: how
Triton is started, stopped and restarted, whether it can be, and where this process reaches it.
``TritonProcess`` is the child process of ``serve`` and of the Triton pod (which binds the pod IP
and waits longer for a start); ``server/remote_triton.py`` holds the remote one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .config import ServeConfig
from .engine import TritonEngine
from .launcher import TritonServer
from .probe import Readiness, probe_inference

Log = Callable[[str], None]
WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # Triton bound everywhere: this process dials loopback


@dataclass(frozen=True)
class TritonEndpoints:
    """Where this process reaches Triton: the engine dials ``grpc_url``; ``/metrics/triton`` relays
    ``metrics_url`` (None: no relay)."""

    grpc_url: str  # HOST:PORT, as tritonclient.grpc wants it
    metrics_url: str | None


class TritonLifecycle(Protocol):
    """What differs between a Triton this process runs and one it only reaches. The blocking
    methods run in an executor thread, never on the event loop."""

    # False: someone else restarts Triton (the remote pod's own supervisor); the supervisor then
    # only re-dials and re-probes, and never gives up
    restartable: bool

    def start(self) -> TritonEndpoints:
        """Start Triton (blocking) and say where it is."""
        ...

    def exited(self) -> str | None:
        """None while Triton runs (or is not ours to watch); otherwise why not, e.g. ``exit code -9``."""
        ...

    def restart(self, kill: bool) -> None:
        """Stop Triton (SIGKILL first when ``kill``) and start it again on the same endpoints (blocking)."""
        ...

    def stop(self, timeout: float) -> None:
        """Stop Triton within ``timeout`` s, then SIGKILL (blocking)."""
        ...


class TritonProcess:
    """Triton as a child ``tritonserver``, bound to ``host``, restarted on the ports of its first start
    (so the engine's address never changes). ``serve`` keeps loopback and the configured ports; the
    Triton pod binds the pod IP on fixed ports and allows a longer start (a large export's models)."""

    restartable = True

    def __init__(self, repository: Path, config: ServeConfig, host: str = "127.0.0.1",
                 start_timeout_s: float = 300.0) -> None:
        self.repository, self.config = repository, config
        self.host, self.start_timeout_s = host, start_timeout_s
        self.server: TritonServer | None = None

    def start(self) -> TritonEndpoints:
        ports, c = self.server.ports if self.server is not None else None, self.config
        self.server = TritonServer(
            self.repository, host=self.host,
            http_port=ports.http if ports else (c.triton_http_port or None),
            grpc_port=ports.grpc if ports else (c.triton_grpc_port or None),
            metrics_port=ports.metrics if ports else (c.triton_metrics_port or None))
        self.server.start(timeout=self.start_timeout_s)
        return self.endpoints()

    def endpoints(self) -> TritonEndpoints:
        """Loopback when Triton binds every address: this process is on Triton's machine."""
        assert self.server is not None, "start() first"
        host = WILDCARD.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return TritonEndpoints(f"{host}:{self.server.ports.grpc}", f"http://{host}:{self.server.ports.metrics}/metrics")

    def exited(self) -> str | None:
        if self.server is not None and self.server.is_alive():
            return None
        return f"exit code {self.server.returncode if self.server is not None else None}"

    def restart(self, kill: bool) -> None:
        if self.server is not None:
            if kill:  # a Triton with a dead stub ignores SIGTERM for 20 s (measured): no drain to wait for
                self.server.kill()
            self.server.stop()
        self.start()

    def stop(self, timeout: float) -> None:
        if self.server is not None:
            self.server.stop(timeout)


class TritonSupervisor:
    """Owns Triton's lifecycle (through its ``TritonLifecycle``) and the service's readiness: watches
    Triton, restarts it when it dies, and decides readiness from "running" plus a real probe
    inference (``server/probe.py``) right after every (re)start and every ``probe_interval_s``.

    Triton stays "ready" while a python-backend stub is dead (model control is off, so a model
    cannot be reloaded alone): after ``probe_failures_before_restart`` failed probes in a row the
    supervisor kills Triton and starts it again, at most ``max_restarts`` times (then ``gave_up``:
    the command exits 1). Between failures it re-probes every ``health_interval_s``, so a dead stub
    costs about interval + K probes + a Triton start. A Triton that is not restartable (another
    pod's) is only re-dialled after a failed probe: its pod replaces it, and the front-end follows.
    """

    def __init__(self, triton: TritonLifecycle, config: ServeConfig, log: Log,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.triton = triton
        self.config = config
        self.log = log
        self.on_change = on_change  # told when readiness flips (gRPC health); None: nobody to tell
        self.restarts = 0
        self.readiness = Readiness()
        self.probe_failures = 0  # failed probes in a row while Triton runs
        self.recoveries_s: list[float] = []  # fault seen -> probe answered again, per recovery
        self.gave_up = False  # max_restarts spent: the command exits 1

    def start(self) -> TritonEndpoints:
        """Start Triton (blocking: run it in an executor)."""
        return self.triton.start()

    def stop(self, timeout: float = 20.0) -> None:
        """Stop Triton (blocking); a remote one outlives this process."""
        self.triton.stop(timeout)

    def _set_ready(self, ready: bool, reason: str = "") -> None:
        if self.readiness.set(ready, reason):
            self.log("ready: probe answered" if ready else f"not ready: {reason}")
            if self.on_change is not None:
                self.on_change(ready)

    async def check(self, engine: TritonEngine) -> bool:
        """Probe now and set readiness from the answer; returns whether it answered."""
        result = await probe_inference(engine, self.config.probe_timeout_s)
        self.readiness.last_probe = result
        if result.ok:
            self.probe_failures = 0
            self._set_ready(True)
        else:
            self.probe_failures += 1
            self._set_ready(False, f"probe failed ({self.probe_failures}/"
                                   f"{self.config.probe_failures_before_restart}): {result.reason}")
        return result.ok

    async def watch(self, stopping: asyncio.Event, engine: TritonEngine) -> None:
        """Until ``stopping`` is set: every ``health_interval_s`` see that Triton runs, and probe it
        when the last probe failed or ``probe_interval_s`` has passed since it answered."""
        c = self.config
        next_probe = time.monotonic() + c.probe_interval_s
        fault_seen: float | None = None  # when the current outage was noticed
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), c.health_interval_s)
                return
            except TimeoutError:
                pass
            exited = self.triton.exited()
            if exited is not None:
                fault_seen = fault_seen or time.monotonic()
                self._set_ready(False, f"triton: not running ({exited}); restarting")
                if not await self._restart(stopping, engine, f"triton is not running ({exited})", kill=False):
                    return
            elif self.readiness.ready and (c.probe_interval_s <= 0 or time.monotonic() < next_probe):
                continue
            elif not await self.check(engine):
                fault_seen = fault_seen or time.monotonic()
                if not self.triton.restartable:
                    await engine.reconnect()  # a Triton pod replaced behind its Service: dial afresh
                elif self.probe_failures >= c.probe_failures_before_restart:
                    reason = f"{self.probe_failures} probes failed while triton runs ({self.readiness.reason})"
                    if not await self._restart(stopping, engine, reason, kill=True):
                        return
            next_probe = time.monotonic() + c.probe_interval_s
            if self.readiness.ready and fault_seen is not None:
                self.recoveries_s.append(time.monotonic() - fault_seen)
                self.log(f"recovered {self.recoveries_s[-1]:.1f} s after the fault was seen")
                fault_seen = None

    async def _restart(self, stopping: asyncio.Event, engine: TritonEngine, reason: str, kill: bool) -> bool:
        """Restart Triton and probe it; False when ``max_restarts`` is spent (``stopping`` is set)."""
        if self.restarts >= self.config.max_restarts:
            self.log(f"{reason}; giving up after {self.restarts} restarts (max_restarts={self.config.max_restarts})")
            self.gave_up = True
            stopping.set()
            return False
        self.restarts += 1
        self.log(f"{reason}; restart {self.restarts}/{self.config.max_restarts}")
        started = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.triton.restart, kill)
        except Exception as error:  # logged; retried on the next tick
            self.log(f"triton restart failed: {error}")
            return True
        await engine.reconnect()
        self.probe_failures = 0
        if await self.check(engine):
            self.log(f"triton is back in {time.perf_counter() - started:.1f} s")
        return True
