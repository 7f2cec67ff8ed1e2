"""The split deployment as its two pods run it: `mofserve triton` (Triton alone, foreground,
supervised) and `mofserve serve --triton-url` (the front-end alone: no export, no Triton child), as
subprocesses on free loopback ports; the front-end's readiness follows the remote Triton, which only
its own pod restarts."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from .processes import children, start_mofserve, stop_process

pytestmark = pytest.mark.integration


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


@pytest.fixture(scope="module")
def split(tiny_repository) -> Iterator[dict]:
    """Triton alone, then a front-end pointed at it (the tiny export is cached by the session fixture)."""
    triton = start_mofserve(["triton", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"], "READY triton")
    frontend = start_mofserve(["serve", "--grpc-port", "0", "--http-port", "0", "--triton-url", triton["grpc"],
                       "--triton-metrics-url", triton["metrics"]], "READY ",
                      env={"MOFSERVE_PROBE_INTERVAL_S": "1", "MOFSERVE_PROBE_TIMEOUT_S": "10",
                           "MOFSERVE_PROBE_FAILURES_BEFORE_RESTART": "1"})
    yield {"triton": triton, "frontend": frontend}
    stop_process(frontend["process"])
    stop_process(triton["process"])


def test_triton_command_serves_on_loopback_with_model_control_none(split):
    triton = split["triton"]
    assert triton["grpc"].startswith("grpc://127.0.0.1:") and triton["metrics"].startswith("http://127.0.0.1:")
    status, _ = _get(f"{triton['http']}/v2/health/ready")
    assert status == 200
    # model control none: the repository is fixed, a load request is refused
    load = urllib.request.Request(f"{triton['http']}/v2/repository/models/llm/load", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(load, timeout=10) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    assert status >= 400


def test_front_end_alone_answers_through_the_remote_triton(split):
    from mofserve.clients import MofServeClient

    frontend = split["frontend"]
    assert children(frontend["process"].pid, "tritonserver") == [], "the front-end must not start a Triton"
    status, body = _get(f"{frontend['http']}/healthz")
    assert status == 200, body
    from mofserve.core.samples import sample_photos

    with MofServeClient(frontend["grpc"]) as client:
        answer = client.ask(sample_photos()[0], "Is the dog facing left or right?", options="(a) Left (b) Right",
                            mode="clip")
    assert answer.chosen_option in ("a", "b")
    assert not any("exporting" in line.lower() or "[mofserve.export" in line for line in frontend["lines"])


def test_front_end_relays_the_remote_tritons_metrics(split):
    status, body = _get(f"{split['frontend']['http']}/metrics/triton")
    assert status == 200 and "nv_inference_count" in body


def _wait_health(http: str, want: int, seconds: float) -> tuple[int, str]:
    deadline = time.monotonic() + seconds
    status, body = _get(f"{http}/healthz")
    while time.monotonic() < deadline and status != want:
        time.sleep(0.5)
        status, body = _get(f"{http}/healthz")
    return status, body


def test_triton_pod_restarts_a_killed_triton_and_the_front_end_follows_without_restarting(split):
    frontend, triton = split["frontend"], split["triton"]
    (child,) = children(triton["process"].pid, "tritonserver")
    os.kill(child, signal.SIGKILL)
    status, _ = _wait_health(frontend["http"], 503, 30)
    assert status == 503, "a front-end whose Triton is gone must leave its Service"
    status, body = _wait_health(frontend["http"], 200, 180)
    assert status == 200, body
    assert triton["process"].poll() is None and frontend["process"].poll() is None
    assert children(triton["process"].pid, "tritonserver") not in ([], [child])
    assert any("restart 1/" in line for line in triton["lines"]), "".join(triton["lines"][-20:])


def test_sigterm_stops_the_triton_pod_cleanly_and_the_front_end_outlives_it(split):
    frontend, triton = split["frontend"], split["triton"]
    assert stop_process(triton["process"]) == 0, "".join(triton["lines"][-20:])
    assert children(triton["process"].pid, "tritonserver") == []
    status, body = _wait_health(frontend["http"], 503, 30)
    assert status == 503 and json.loads(body).get("status") != "ok", body
    assert frontend["process"].poll() is None, "a front-end outlives its Triton; it never restarts it"
    assert stop_process(frontend["process"]) == 0
