"""The supervision policy of server/supervisor.py against a fake Triton and a fake probe, in
milliseconds: restart on death and after K failed probes, readiness (and gRPC health) NOT_SERVING
meanwhile, giving up after ``max_restarts``, and a remote Triton that is only re-dialled. The real
processes are covered by tests/e2e/test_faults.py and tests/e2e/test_split_deployment.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from mofserve.server import supervisor as supervision
from mofserve.server.config import ServeConfig
from mofserve.server.probe import ProbeResult
from mofserve.server.remote_triton import RemoteTriton
from mofserve.server.supervisor import TritonEndpoints, TritonProcess, TritonSupervisor
from mofserve.server.triton_resources import TritonPorts

FAST = ServeConfig(health_interval_s=0.01, probe_interval_s=0.02, probe_timeout_s=1.0,
                   probe_failures_before_restart=2, max_restarts=2)


class FakeEngine:
    """What the supervisor uses of ``TritonEngine``: ``reconnect``; ``answers`` is what the fake probe reads."""

    def __init__(self) -> None:
        self.answers = True
        self.reconnects = 0

    async def reconnect(self) -> None:
        self.reconnects += 1


class FakeTriton:
    """A ``TritonLifecycle`` whose process dies, or whose probe fails, on the test's word."""

    restartable = True

    def __init__(self, engine: FakeEngine, heals: bool = True) -> None:
        self.engine, self.heals = engine, heals
        self.running = True
        self.restarts: list[bool] = []  # kill flag per restart
        self.stopped: float | None = None

    def start(self) -> TritonEndpoints:
        return TritonEndpoints("127.0.0.1:1", None)

    def exited(self) -> str | None:
        return None if self.running else "exit code -9"

    def restart(self, kill: bool) -> None:
        self.restarts.append(kill)
        self.running, self.engine.answers = True, self.heals

    def stop(self, timeout: float) -> None:
        self.stopped = timeout


@pytest.fixture(autouse=True)
def fake_probe(monkeypatch):
    async def probe(engine: FakeEngine, timeout: float) -> ProbeResult:
        return ProbeResult(engine.answers, "" if engine.answers else "llm: unavailable: stub", 0.0, ("llm",))

    monkeypatch.setattr(supervision, "probe_inference", probe)


def _run(supervisor: TritonSupervisor, engine: FakeEngine, fault, until, seconds: float = 5.0) -> None:
    """Probe once (as serve does at start), inject ``fault``, watch until ``until()`` or the supervisor stops."""

    async def main() -> None:
        stopping = asyncio.Event()
        assert await supervisor.check(engine)
        watch = asyncio.create_task(supervisor.watch(stopping, engine))
        fault()
        deadline = asyncio.get_running_loop().time() + seconds
        while not until() and not watch.done():
            assert asyncio.get_running_loop().time() < deadline, supervisor.readiness
            await asyncio.sleep(0.005)
        stopping.set()
        await watch

    asyncio.run(main())


def _supervisor(triton, changes: list[bool], config: ServeConfig = FAST) -> TritonSupervisor:
    return TritonSupervisor(triton, config, lambda message: None, on_change=changes.append)


def test_a_dead_triton_is_restarted_and_readiness_is_withdrawn_meanwhile():
    engine, changes = FakeEngine(), []
    triton = FakeTriton(engine)
    supervisor = _supervisor(triton, changes)
    _run(supervisor, engine, lambda: setattr(triton, "running", False), lambda: len(supervisor.recoveries_s) == 1)
    assert triton.restarts == [False]  # died on its own: a plain stop, no kill
    assert changes == [True, False, True] and supervisor.readiness.ready
    assert engine.reconnects == 1 and supervisor.restarts == 1 and not supervisor.gave_up


def test_k_failed_probes_while_triton_runs_kill_and_restart_it():
    engine, changes = FakeEngine(), []
    triton = FakeTriton(engine)
    supervisor = _supervisor(triton, changes)
    _run(supervisor, engine, lambda: setattr(engine, "answers", False), lambda: len(supervisor.recoveries_s) == 1)
    assert triton.restarts == [True]  # a dead stub: Triton ignores SIGTERM, so it is killed
    assert changes == [True, False, True]
    assert supervisor.probe_failures == 0 and supervisor.readiness.last_probe.ok


def test_after_max_restarts_the_supervisor_gives_up_and_stops():
    engine, changes = FakeEngine(), []
    triton = FakeTriton(engine, heals=False)
    supervisor = _supervisor(triton, changes)
    _run(supervisor, engine, lambda: setattr(engine, "answers", False), lambda: False)
    assert supervisor.gave_up and triton.restarts == [True, True]
    assert not supervisor.readiness.ready and "probe failed" in supervisor.readiness.reason
    supervisor.stop(3.0)
    assert triton.stopped == 3.0


def test_a_remote_triton_is_redialled_after_a_failed_probe_and_never_restarted():
    engine, changes = FakeEngine(), []
    remote = RemoteTriton("grpc://triton:8001", None)
    supervisor = _supervisor(remote, changes, ServeConfig(health_interval_s=0.01, probe_interval_s=0.02,
                                                         probe_failures_before_restart=1, max_restarts=0))

    def fail_then_heal() -> bool:
        if engine.reconnects >= 3:
            engine.answers = True
        return engine.reconnects >= 3 and supervisor.readiness.ready

    _run(supervisor, engine, lambda: setattr(engine, "answers", False), fail_then_heal)
    assert changes == [True, False, True] and not supervisor.gave_up and supervisor.restarts == 0
    with pytest.raises(RuntimeError, match="its own pod"):
        remote.restart(kill=True)


def test_endpoints_of_each_lifecycle():
    assert RemoteTriton("grpc://triton:8001/", "http://triton:8002/metrics").start() == TritonEndpoints(
        "triton:8001", "http://triton:8002/metrics")
    for host, seen in (("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("::", "[::1]"), ("10.0.0.7", "10.0.0.7")):
        process = TritonProcess(None, FAST, host=host)
        process.server = SimpleNamespace(ports=TritonPorts(8000, 8001, 8002))
        assert process.endpoints() == TritonEndpoints(f"{seen}:8001", f"http://{seen}:8002/metrics")

