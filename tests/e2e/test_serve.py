"""`mofserve serve` as users run it: a subprocess that exports, starts Triton and both front-ends,
restarts Triton when it dies without restarting the front-end, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from .processes import children, kill_process, start_mofserve

pytestmark = pytest.mark.integration


def _healthz(http: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{http}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
    except OSError:
        return 0, {}


@pytest.fixture(scope="module")
def served(tiny_repository) -> Iterator[dict]:
    """`mofserve serve` on free ports (the tiny export is already cached by the session fixture)."""
    server = start_mofserve(["serve", "--grpc-port", "0", "--http-port", "0"])
    yield server
    kill_process(server["process"])


def test_serve_prints_endpoints_and_reports_healthy(served):
    status, body = _healthz(served["http"])
    assert status == 200 and body["status"] == "ok"
    assert served["grpc"].startswith("127.0.0.1:")
    assert any("seeded RANDOM weights" in line for line in served["lines"])


def test_supervisor_restarts_a_killed_triton_and_service_recovers(served):
    process = served["process"]
    tritons = children(process.pid, "tritonserver")
    assert len(tritons) == 1
    os.kill(tritons[0], signal.SIGKILL)
    went_down = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, _ = _healthz(served["http"])
        went_down = went_down or status == 503
        new = children(process.pid, "tritonserver")
        if went_down and status == 200 and new and new != tritons:
            break
        time.sleep(0.2)
    else:
        pytest.fail("service did not recover:\n" + "".join(served["lines"][-30:]))
    assert process.poll() is None, "the front-end must not restart with Triton"
    assert any("restart 1/" in line for line in served["lines"])


def test_sigterm_stops_the_front_end_and_triton(served):
    process = served["process"]
    tritons = children(process.pid, "tritonserver")
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    time.sleep(0.5)
    from pathlib import Path

    for pid in tritons:
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text().lower()


def test_a_killed_front_end_takes_its_triton_with_it():
    """SIGKILL (or the OOM killer) gives ``serve`` no chance to stop Triton: the kernel does
    (``PR_SET_PDEATHSIG``), so no orphan Triton and stubs keep the machine's memory or GPU."""
    from pathlib import Path

    server = start_mofserve(["serve", "--grpc-port", "0", "--http-port", "0"])
    process = server["process"]
    (triton,) = children(process.pid, "tritonserver")
    stubs = children(triton, "triton_python_backend_stub")
    assert stubs
    kill_process(process)
    deadline = time.monotonic() + 60
    alive = [triton, *stubs]
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists()
                 and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
        time.sleep(0.2)
    assert not alive, f"processes left behind by a killed front-end: {alive}"
