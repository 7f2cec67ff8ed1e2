"""``mofserve serve``: export if needed, start Triton, start the gRPC and HTTP front-ends on one
asyncio loop, supervise Triton (restart it when it dies) and stop everything on SIGINT/SIGTERM.

The front-end never restarts with Triton: while Triton is down, health says NOT_SERVING / 503
and requests fail fast with UNAVAILABLE; when the supervisor has it back, service resumes.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from mofserve.core.profiles import get_profile

from .admission import Admission, AdmissionLimits
from .config import ServeConfig
from .engine import ServingInfo, TritonEngine
from .launcher import TritonServer
from .metrics import FrontendMetrics
from .probe import Readiness, probe_inference
from .security import GrpcBearerAuth, Security, http_bearer_auth

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    print(f"[serve] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Endpoints:
    grpc: str
    http: str
    triton_grpc: str
    triton_metrics: str


class TritonSupervisor:
    """Owns the tritonserver process and the service's readiness: starts Triton, watches it,
    restarts it on the same ports, and decides readiness from "running" plus a real probe
    inference (``server/probe.py``) right after every (re)start and every ``probe_interval_s``.

    Triton stays "ready" while a python-backend stub is dead (model control is off, so a model
    cannot be reloaded alone): after ``probe_failures_before_restart`` failed probes in a row the
    supervisor kills Triton and starts it again. Between failures it re-probes every
    ``health_interval_s``, so a dead stub costs about interval + K probes + a Triton start.
    """

    def __init__(self, repository, config: ServeConfig, on_change: Callable[[bool], None], log: Log) -> None:
        self.repository = repository
        self.config = config
        self.on_change = on_change  # told when readiness flips (gRPC health)
        self.log = log
        self.restarts = 0
        self.server: TritonServer | None = None
        self.readiness = Readiness()
        self.probe_failures = 0  # failed probes in a row while Triton runs
        self.recoveries_s: list[float] = []  # fault seen -> probe answered again, per recovery
        self.gave_up = False  # max_restarts spent: serve exits 1

    def start(self) -> TritonServer:
        ports = self.server.ports if self.server is not None else None
        self.server = TritonServer(
            self.repository,
            http_port=ports.http if ports else (self.config.triton_http_port or None),
            grpc_port=ports.grpc if ports else (self.config.triton_grpc_port or None),
            metrics_port=ports.metrics if ports else (self.config.triton_metrics_port or None),
        )
        return self.server.start(timeout=300)

    def _set_ready(self, ready: bool, reason: str = "") -> None:
        if self.readiness.set(ready, reason):
            self.log("ready: probe answered" if ready else f"not ready: {reason}")
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
        c = self.config
        next_probe = time.monotonic() + c.probe_interval_s
        fault_seen: float | None = None  # when the current outage was noticed
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), c.health_interval_s)
                return
            except TimeoutError:
                pass
            if self.server is None or not self.server.is_alive():
                code = self.server.returncode if self.server else None
                fault_seen = fault_seen or time.monotonic()
                self._set_ready(False, f"triton: not running (exit code {code}); restarting")
                if not await self._restart(stopping, engine, f"triton is not running (exit code {code})", kill=False):
                    return
            elif self.readiness.ready and (c.probe_interval_s <= 0 or time.monotonic() < next_probe):
                continue
            elif not await self.check(engine):
                fault_seen = fault_seen or time.monotonic()
                if self.probe_failures >= c.probe_failures_before_restart:
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
            await asyncio.get_running_loop().run_in_executor(None, self._restart_blocking, kill)
        except Exception as error:  # logged; retried on the next tick
            self.log(f"triton restart failed: {error}")
            return True
        await engine.reconnect()
        self.probe_failures = 0
        if await self.check(engine):
            self.log(f"triton is back in {time.perf_counter() - started:.1f} s")
        return True

    def _restart_blocking(self, kill: bool) -> None:
        if self.server is not None:
            if kill:  # a Triton with a dead stub ignores SIGTERM for 20 s (measured): no drain to wait for
                self.server.kill()
            self.server.stop()
        self.start()

    def stop(self, timeout: float = 20.0) -> None:
        if self.server is not None:
            self.server.stop(timeout)


class MofServeApp:
    def __init__(self, config: ServeConfig, log: Log = stderr_log) -> None:
        self.config = config
        self.log = log
        self.metrics = FrontendMetrics()
        self.engine: TritonEngine | None = None
        self.supervisor: TritonSupervisor | None = None
        self._grpc_server = None
        self._health = None
        self._http_runner = None
        self.endpoints: Endpoints | None = None
        self.stopping = asyncio.Event()

    def _triton_metrics_url(self) -> str | None:
        if getattr(self.supervisor, "remote", False):  # --triton-url: --triton-metrics-url, or no relay
            return self.supervisor.metrics_url
        server = self.supervisor.server if self.supervisor is not None else None
        return server.metrics_url if server is not None else None

    def _set_serving(self, serving: bool) -> None:
        if self._health is not None:
            self._health.set_serving(serving)

    async def start(self) -> Endpoints:
        from mofserve.export.pipeline import export_profile

        from .grpc_service import build_grpc_server
        from .http_api import build_http_app, start_http

        loop = asyncio.get_running_loop()
        c = self.config
        # checked before anything starts, so a bad setting fails fast with the setting's name
        security = Security.from_settings(c.tls_cert_file, c.tls_key_file, c.tls_client_ca_file, c.auth_token,
                                          c.auth_token_file)
        admission = Admission(AdmissionLimits(c.max_in_flight, c.max_queue, c.default_deadline_s,
                                              c.max_deadline_s), self.metrics)  # one queue for both transports
        for warning in security.warnings(c.host):
            self.log(warning)
        profile = get_profile(c.profile).with_sources(clip=c.clip, dinov2=c.dinov2, llava=c.llava)
        if c.triton_url:  # the front-end alone, before a Triton it does not own (server/remote_triton.py)
            from .remote_triton import RemoteTriton

            self.supervisor = RemoteTriton(c.triton_url, c.triton_metrics_url, c, self._set_serving, self.log)
            triton, versions = self.supervisor.start(), {}  # nothing exported here: no digests to report
        else:
            built = await loop.run_in_executor(None, lambda: export_profile(profile, target=c.target))
            self.supervisor = TritonSupervisor(built.path, c, self._set_serving, self.log)
            triton = await loop.run_in_executor(None, self.supervisor.start)
            versions = {name: graph.digest for name, graph in built.graphs.items()}
            versions["llava"] = built.checkpoints.llava.name
        info = ServingInfo(profile=profile.name, random_weights=profile.random_weights, versions=versions)
        self.engine = TritonEngine(triton.grpc_url, info, c.limits, max_batch_size=profile.serving.max_batch_size)
        self._grpc_server, grpc_port, self._health = build_grpc_server(
            self.engine, self.metrics, host=c.host, port=c.grpc_port, max_message_bytes=c.max_message_bytes or None,
            admission=admission, credentials=security.grpc_credentials(),
            interceptors=[GrpcBearerAuth(security.token, self.metrics)] if security.token else ())
        await self._grpc_server.start()
        app = build_http_app(self.engine, self.metrics, triton_metrics_url=self._triton_metrics_url,
                             max_body_bytes=c.max_body_bytes or None, admission=admission,
                             middlewares=[http_bearer_auth(security.token, self.metrics)] if security.token else ())
        self._http_runner, http_port = await start_http(app, host=c.host, port=c.http_port,
                                                        shutdown_timeout_s=c.shutdown_grace_s,
                                                        ssl_context=security.http_ssl_context())
        self.engine.readiness = self.supervisor.readiness  # /healthz and ready() follow the supervisor
        self._set_serving(await self.supervisor.check(self.engine))  # a real probe, not Triton's word
        scheme = "https" if security.tls else "http"
        self.endpoints = Endpoints(f"{c.host}:{grpc_port}", f"{scheme}://{c.host}:{http_port}", triton.grpc_url,
                                   triton.metrics_url)
        return self.endpoints

    async def stop(self) -> None:
        """Drain, then stop Triton, all within ``shutdown_grace_s`` (plus Triton's SIGKILL).

        New gRPC calls get UNAVAILABLE and the HTTP port stops listening at once; requests in
        flight on both transports get the grace together (not one after the other). Triton then
        has what is left of it, at least 2 s, to stop: nothing of ours is in flight there any more,
        and under load its python models can take longer than that to unload (seen: 10 s+), so
        it is killed rather than waited for."""
        ends = time.monotonic() + self.config.shutdown_grace_s
        self._set_serving(False)
        if self.supervisor is not None:
            self.supervisor.readiness.set(False, "stopping")
        grace = self.config.shutdown_grace_s
        drains = []
        if self._grpc_server is not None:
            drains.append(self._grpc_server.stop(grace))  # in-flight RPCs get `grace` seconds to finish
        if self._http_runner is not None:
            drains.append(self._http_runner.cleanup())  # its shutdown_timeout is `grace` (see start)
        await asyncio.gather(*drains)
        if self.engine is not None:
            await self.engine.close()
        if self.supervisor is not None:
            left = max(ends - time.monotonic(), 2.0)
            await asyncio.get_running_loop().run_in_executor(None, self.supervisor.stop, left)

    async def run(self, install_signals: bool = True) -> int:
        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stopping.set)
        try:
            endpoints = await self.start()
            profile = get_profile(self.config.profile)
            self.log(f"serving profile {profile.name}: gRPC {endpoints.grpc}, HTTP {endpoints.http} "
                     f"(OpenAI-compatible /v1/chat/completions), metrics {endpoints.http}/metrics; "
                     f"Triton gRPC {endpoints.triton_grpc}, Triton metrics {endpoints.triton_metrics}")
            if profile.random_weights:
                self.log(f"profile {profile.name} has seeded RANDOM weights: answers are not meaningful")
            print(f"READY grpc={endpoints.grpc} http={endpoints.http}", flush=True)
            assert self.supervisor is not None and self.engine is not None
            await self.supervisor.watch(self.stopping, self.engine)
            return 1 if self.supervisor.gave_up else 0
        finally:
            self.log("stopping")
            await self.stop()
            self.log("stopped")


def serve(config: ServeConfig) -> int:
    return asyncio.run(MofServeApp(config).run())
