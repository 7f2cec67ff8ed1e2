"""``mofserve serve``: export if needed, start Triton, start the gRPC and HTTP front-ends on one
asyncio loop, supervise Triton (restart it when it dies) and stop everything on SIGINT/SIGTERM.

This is the composition root: it picks Triton's lifecycle (a child ``TritonProcess``, or with
``--triton-url`` a ``RemoteTriton``) and wires the engine, both transports and the supervisor
(server/supervisor.py) around it; nothing here depends on which lifecycle it picked.

The front-end never restarts with Triton: while Triton is down, health says NOT_SERVING / 503
and requests fail fast with UNAVAILABLE; when the supervisor has it back, service resumes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

from mofserve.core.profiles import get_profile

from .admission import Admission, AdmissionLimits
from .config import ServeConfig
from .engine import ServingInfo, TritonEngine
from .grpc_service import build_grpc_server
from .http_api import build_http_app, start_http
from .metrics import FrontendMetrics
from .remote_triton import RemoteTriton
from .security import GrpcBearerAuth, Security, http_bearer_auth
from .supervisor import Log, TritonLifecycle, TritonProcess, TritonSupervisor
from .web_routes import add_web_routes, open_http_paths

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoints:
    grpc: str
    http: str
    triton_grpc: str
    triton_metrics: str | None  # None: a remote Triton without --triton-metrics-url


class MofServeApp:
    def __init__(self, config: ServeConfig, log: Log = _logger.info) -> None:
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

    def _set_serving(self, serving: bool) -> None:
        if self._health is not None:
            self._health.set_serving(serving)

    async def start(self) -> Endpoints:
        # lazy: it imports torch (seconds), which a front-end before a remote Triton never needs
        from mofserve.export.pipeline import export_profile

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
        lifecycle: TritonLifecycle
        if c.triton_url:  # the front-end alone, before a Triton it does not own (server/remote_triton.py)
            lifecycle, versions = RemoteTriton(c.triton_url, c.triton_metrics_url), {}  # nothing exported here
        else:
            built = await loop.run_in_executor(None, lambda: export_profile(profile, target=c.target))
            lifecycle = TritonProcess(built.path, c)
            versions = {name: graph.digest for name, graph in built.graphs.items()}
            versions["llava"] = built.checkpoints.llava.name
        self.supervisor = TritonSupervisor(lifecycle, c, self.log, on_change=self._set_serving)
        triton = await loop.run_in_executor(None, self.supervisor.start)
        info = ServingInfo(profile=profile.name, random_weights=profile.random_weights, versions=versions)
        self.engine = TritonEngine(triton.grpc_url, info, c.limits, max_batch_size=profile.serving.max_batch_size)
        self._grpc_server, grpc_port, self._health = build_grpc_server(
            self.engine, self.metrics, host=c.host, port=c.grpc_port, max_message_bytes=c.max_message_bytes or None,
            admission=admission, credentials=security.grpc_credentials(),
            interceptors=[GrpcBearerAuth(security.token, self.metrics)] if security.token else ())
        await self._grpc_server.start()
        app = build_http_app(self.engine, self.metrics, triton_metrics_url=lambda: triton.metrics_url,
                             max_body_bytes=c.max_body_bytes or None, admission=admission,
                             middlewares=[http_bearer_auth(security.token, self.metrics, open_http_paths(c.playground))]
                             if security.token else ())
        add_web_routes(app, self.engine, self.metrics, admission, c, profile, auth=security.token is not None,
                       tls=security.tls, triton_metrics=triton.metrics_url is not None)  # info, similarity, playground
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
            if self.config.playground:
                self.log(f"playground: {endpoints.http}/")
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
