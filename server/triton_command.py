"""``mofserve triton``: export if needed, then run Triton alone in the foreground, supervised.

The Triton Deployment of the split Kubernetes layout (``deploy/kubernetes/overlays/split``) runs
this; its front-ends run ``mofserve serve --triton-url``. Triton is watched exactly as ``serve``
watches its child (``TritonSupervisor`` with a ``TritonProcess`` bound to ``host``,
server/supervisor.py): restarted on the same ports when it dies, and when a real probe inference
fails ``probe_failures_before_restart`` times in a row while Triton still says ready (a dead
python-backend stub, which Triton's ``/v2/health/ready`` never reports). Without
this, a Triton pod with a dead stub would stay "ready" and every front-end before it unready. After
``max_restarts`` the command exits 1 and the kubelet restarts the pod. Model control stays
``none`` (the repository is fixed at start, as in ``serve``); settings such as ``max_restarts``
and ``probe_interval_s`` come from ``MOFSERVE_*`` as for ``serve``.

Triton has no authentication of its own. The default address is loopback; binding the pod IP
(``--host 0.0.0.0``) is what the split layout needs, and it is only safe behind the NetworkPolicy
that lets the front-end pods alone reach these ports (docs/deployment.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import TYPE_CHECKING

from mofserve.core.profiles import Profile, add_profile_arguments, profile_from_args
from mofserve.core.targets import TARGETS

if TYPE_CHECKING:
    from .config import ServeConfig
    from .supervisor import Log

LOOPBACK = ("127.0.0.1", "::1", "localhost")
_logger = logging.getLogger(__name__)


async def _serve(profile: Profile, target: str, host: str, config: ServeConfig, start_timeout_s: float,
                 log: Log) -> int:
    # `mofserve triton --help` and the CLI's argument checks should not wait for torch (seconds)
    from mofserve.export.pipeline import export_profile  # lazy: torch

    from .engine import ServingInfo, TritonEngine  # lazy: Triton's client, and torch through core.conversation
    from .supervisor import TritonProcess, TritonSupervisor  # lazy: the engine (as above)

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    built = await loop.run_in_executor(None, lambda: export_profile(profile, target=target, log=log))
    process = TritonProcess(built.path, config, host=host, start_timeout_s=start_timeout_s)
    supervisor = TritonSupervisor(process, config, log)  # no front-end here: readiness is only logged
    try:
        triton = await loop.run_in_executor(None, supervisor.start)
        server = process.server
        assert server is not None
        info = ServingInfo(profile=profile.name, random_weights=profile.random_weights)
        engine = TritonEngine(triton.grpc_url, info, config.limits, max_batch_size=profile.serving.max_batch_size)
        try:
            answered = await supervisor.check(engine)
            log(f"Triton up ({profile.name}, {target}); probe inference {'answered' if answered else 'FAILED'}; "
                f"log {server.log_path}")
            print(f"READY triton grpc=grpc://{server.grpc_url} http=http://{server.http_url} "
                  f"metrics={server.metrics_url}", flush=True)
            await supervisor.watch(stopping, engine)
            return 1 if supervisor.gave_up else 0
        finally:
            log("stopping")
            await engine.close()
    finally:
        await loop.run_in_executor(None, supervisor.stop, max(config.shutdown_grace_s, 1.0))


def run_triton(profile: Profile, target: str = "cpu", host: str = "127.0.0.1", http_port: int = 8000,
               grpc_port: int = 8001, metrics_port: int = 8002, start_timeout_s: float = 600.0,
               log: Log = _logger.info) -> int:
    """Serve ``profile`` for ``target`` until SIGTERM/SIGINT; 1 when Triton could not be kept alive."""
    from .config import load_config  # lazy: the engine's limits (as in _serve)

    for name, port in (("http_port", http_port), ("grpc_port", grpc_port), ("metrics_port", metrics_port)):
        if not 0 <= port < 65536:
            raise ValueError(f"{name}: expected 0..65535 (0: a free port), got {port}")
    if host not in LOOPBACK:
        log(f"binding {host}: Triton has no authentication; expose it only to the front-ends "
            "(the split layout's NetworkPolicy)")
    config = load_config(flags={"triton_http_port": http_port, "triton_grpc_port": grpc_port,
                                "triton_metrics_port": metrics_port})
    return asyncio.run(_serve(profile, target, host, config, start_timeout_s, log))


def arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mofserve triton``: the profile, the target, and where Triton listens."""
    add_profile_arguments(parser)
    parser.add_argument("--target", default="cpu", choices=TARGETS)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address Triton binds (default 127.0.0.1; 0.0.0.0 in a pod, behind a NetworkPolicy)")
    parser.add_argument("--http-port", type=int, default=8000, help="Triton HTTP (default 8000; 0: a free port)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC (default 8001; 0: a free port)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Triton metrics (default 8002; 0: free)")


def run(args: argparse.Namespace) -> int:
    """``mofserve triton``: :func:`run_triton` on the profile and ports the flags name."""
    return run_triton(profile_from_args(args), target=args.target, host=args.host, http_port=args.http_port,
                      grpc_port=args.grpc_port, metrics_port=args.metrics_port)
