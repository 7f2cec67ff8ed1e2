"""Admission control (server/admission.py): slots, FIFO queue, fast rejection with retry advice,
deadlines in the queue, and no slot leaked whatever happens to a request."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from mofserve.server.admission import (
    MAX_RETRY_S,
    MIN_RETRY_S,
    Admission,
    AdmissionLimits,
    Overloaded,
    remaining,
    retry_after,
)
from mofserve.server.engine import EngineError
from mofserve.server.grpc_service import GRPC_STATUS
from mofserve.server.metrics import FrontendMetrics
from mofserve.server.openai_protocol import HTTP_STATUS


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def _hold(admission: Admission, release: asyncio.Event, log: list, name: str, timeout: float | None = None):
    async with admission.admit(timeout, "test"):
        log.append(name)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_limits_refuse_nonsense_naming_the_setting():
    for kwargs, name in (({"max_in_flight": 0}, "max_in_flight"), ({"max_queue": -1}, "max_queue"),
                         ({"default_deadline_s": 0}, "default_deadline_s"),
                         ({"default_deadline_s": 10, "max_deadline_s": 5}, "max_deadline_s")):
        with pytest.raises(ValueError, match=name):
            AdmissionLimits(**kwargs)


def test_requests_beyond_in_flight_and_queue_are_rejected_at_once_naming_both_limits():
    async def scenario():
        admission = Admission(AdmissionLimits(max_in_flight=2, max_queue=1))
        release = asyncio.Event()
        log: list[str] = []
        holders = [asyncio.create_task(_hold(admission, release, log, f"r{i}")) for i in range(3)]
        await _settle()
        assert (admission.executing, admission.queued) == (2, 1)
        started = time.monotonic()
        with pytest.raises(Overloaded) as caught:
            async with admission.admit(None, "test"):
                pass
        assert time.monotonic() - started < 0.5  # refused, not queued
        release.set()
        await asyncio.gather(*holders)
        return caught.value, log

    error, log = run(scenario())
    assert error.code == "resource_exhausted" and GRPC_STATUS[error.code] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert HTTP_STATUS[error.code] == 429
    assert "2 requests in flight (max_in_flight=2)" in error.message
    assert "1 queued (max_queue=1)" in error.message and "retry after" in error.message
    assert retry_after(error) == error.retry_after_s > 0
    assert log == ["r0", "r1", "r2"]


def test_queue_is_first_in_first_out():
    async def scenario():
        admission = Admission(AdmissionLimits(max_in_flight=1, max_queue=10))
        gates = [asyncio.Event() for _ in range(5)]
        log: list[str] = []
        tasks = []
        for i, gate in enumerate(gates):
            tasks.append(asyncio.create_task(_hold(admission, gate, log, f"r{i}")))
            await _settle()
        assert (admission.executing, admission.queued) == (1, 4)
        for gate in gates:  # finishing one lets in exactly the oldest waiter
            gate.set()
            await _settle()
        await asyncio.gather(*tasks)
        return log, admission

    log, admission = run(scenario())
    assert log == ["r0", "r1", "r2", "r3", "r4"]
    assert (admission.executing, admission.queued) == (0, 0)


def test_a_new_request_does_not_overtake_the_queue():
    async def scenario():
        admission = Admission(AdmissionLimits(max_in_flight=1, max_queue=5))
        first, second = asyncio.Event(), asyncio.Event()
        log: list[str] = []
        a = asyncio.create_task(_hold(admission, first, log, "a"))
        await _settle()
        b = asyncio.create_task(_hold(admission, second, log, "b"))
        await _settle()
        first.set()
        # the slot passes straight to "b": a newcomer arriving now waits behind it
        done = asyncio.Event()
        done.set()
        c = asyncio.create_task(_hold(admission, done, log, "c", timeout=2))
        await _settle()
        second.set()
        await asyncio.gather(a, b)
        await c
        return log

    assert run(scenario()) == ["a", "b", "c"]


def test_deadline_expiring_in_the_queue_leaves_it_with_deadline_exceeded():
    async def scenario():
        metrics = FrontendMetrics()
        admission = Admission(AdmissionLimits(max_in_flight=1, max_queue=4), metrics)
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(admission, release, [], "holder"))
        await _settle()
        started = time.monotonic()
        with pytest.raises(EngineError) as caught:
            async with admission.admit(0.1, "grpc"):
                pass
        waited = time.monotonic() - started
        queued_after = admission.queued
        release.set()
        await holder
        return caught.value, waited, queued_after, admission, metrics

    error, waited, queued_after, admission, metrics = run(scenario())
    assert error.code == "deadline_exceeded" and "admission queue" in error.message
    assert error.message.startswith("deadline:")
    assert 0.09 <= waited < 2.0
    assert queued_after == 0
    assert admission.executing == 0
    assert metrics.admission_rejected.labels("grpc", "deadline")._value.get() == 1


def test_an_expired_deadline_is_refused_before_taking_a_slot():
    async def scenario():
        admission = Admission()
        with pytest.raises(EngineError) as caught:
            async with admission.admit(0.0):
                pass
        return caught.value, admission.executing

    error, executing = run(scenario())
    assert error.code == "deadline_exceeded" and executing == 0


def test_slots_are_not_leaked_by_exceptions_or_cancellation():
    async def scenario():
        admission = Admission(AdmissionLimits(max_in_flight=2, max_queue=4))

        async def failing():
            async with admission.admit(None):
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await failing()
        # cancel both executing and queued requests
        release = asyncio.Event()
        tasks = [asyncio.create_task(_hold(admission, release, [], f"r{i}")) for i in range(5)]
        await _settle()
        assert (admission.executing, admission.queued) == (2, 3)
        for task in tasks[1:4]:  # one executing, two queued
            task.cancel()
        await _settle()
        assert admission.executing == 2  # a cancelled holder's slot went to a waiter
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return admission, results

    admission, results = run(scenario())
    assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 3
    assert (admission.executing, admission.queued) == (0, 0)


def test_a_waiter_cancelled_just_as_it_is_granted_hands_the_slot_on():
    async def scenario():
        admission = Admission(AdmissionLimits(max_in_flight=1, max_queue=4))
        log: list[str] = []
        holder = admission.admit(None)
        await holder.__aenter__()
        doomed = asyncio.create_task(_hold(admission, asyncio.Event(), log, "doomed"))
        await _settle()
        done = asyncio.Event()
        done.set()
        third = asyncio.create_task(_hold(admission, done, log, "third", timeout=2))
        await _settle()
        await holder.__aexit__(None, None, None)  # grants "doomed" without yielding to the loop
        doomed.cancel()  # ... which is cancelled before it resumes
        results = await asyncio.gather(doomed, third, return_exceptions=True)
        return admission, log, results

    admission, log, results = run(scenario())
    assert isinstance(results[0], asyncio.CancelledError)
    assert log == ["third"]
    assert (admission.executing, admission.queued) == (0, 0)


def test_retry_advice_follows_service_time_and_queue_position_within_bounds():
    admission = Admission(AdmissionLimits(max_in_flight=2, max_queue=8))
    admission._service_s = 0.4
    assert admission.retry_after_s(0) == pytest.approx(0.4)
    assert admission.retry_after_s(1) == pytest.approx(0.4)  # the second wave starts after one service time
    assert admission.retry_after_s(4) == pytest.approx(1.2)
    admission._service_s = 1e-6
    assert admission.retry_after_s(0) == MIN_RETRY_S
    admission._service_s = 1e6
    assert admission.retry_after_s(0) == MAX_RETRY_S


def test_service_time_average_tracks_how_long_slots_are_held():
    async def scenario():
        admission = Admission()
        for _ in range(20):
            async with admission.admit(None):
                await asyncio.sleep(0.01)
        return admission.service_s

    assert 0.005 < run(scenario()) < 0.5  # from the initial 1 s towards ~0.01 s


def test_retry_after_header_is_whole_seconds_at_least_one():
    assert Overloaded("busy", 0.05).retry_after_header == "1"
    assert Overloaded("busy", 1.2).retry_after_header == "2"
    assert Overloaded("busy", 0.4).retry_after_ms == 400


def test_deadline_defaults_and_clamps():
    admission = Admission(AdmissionLimits(default_deadline_s=30, max_deadline_s=60))
    assert admission.timeout(None) == 30
    assert admission.timeout(5) == 5
    assert admission.timeout(3600) == 60


def test_admit_yields_the_absolute_deadline():
    async def scenario():
        admission = Admission(AdmissionLimits(default_deadline_s=30, max_deadline_s=60))
        async with admission.admit(None) as deadline:
            return remaining(deadline)

    assert 29 < run(scenario()) <= 30


def test_metrics_show_queue_depth_executing_and_rejections():
    async def scenario():
        metrics = FrontendMetrics()
        admission = Admission(AdmissionLimits(max_in_flight=1, max_queue=1), metrics)
        release = asyncio.Event()
        tasks = [asyncio.create_task(_hold(admission, release, [], f"r{i}")) for i in range(2)]
        await _settle()
        during = (metrics.admission_executing._value.get(), metrics.admission_queued._value.get())
        with pytest.raises(Overloaded):
            async with admission.admit(None, "http"):
                pass
        release.set()
        await asyncio.gather(*tasks)
        after = (metrics.admission_executing._value.get(), metrics.admission_queued._value.get())
        return metrics, during, after

    metrics, during, after = run(scenario())
    assert during == (1, 1) and after == (0, 0)
    assert metrics.admission_rejected.labels("http", "queue_full")._value.get() == 1
    text = metrics.exposition().decode()
    for name in ("mofserve_admission_queue_depth", "mofserve_admission_executing",
                 "mofserve_admission_rejected_total", "mofserve_admission_wait_seconds_bucket"):
        assert name in text


def test_serve_flags_environment_and_file_set_the_admission_and_security_settings(tmp_path):
    from mofserve.cli import build_parser
    from mofserve.server.config import ServeConfig, load_config
    from mofserve.server.serve_command import SERVE_LIMIT_AND_SECURITY_FLAGS

    args = build_parser().parse_args(["serve", "--max-in-flight", "3", "--max-queue", "0", "--default-deadline-s",
                                      "20", "--max-deadline-s", "40", "--max-message-bytes", "1000",
                                      "--max-body-bytes", "2000", "--tls-cert-file", "c.pem", "--tls-key-file",
                                      "k.pem", "--tls-client-ca-file", "ca.pem", "--auth-token-file", "t"])
    flags = {name: getattr(args, name) for name in SERVE_LIMIT_AND_SECURITY_FLAGS}
    config = load_config(None, flags, environ={})
    assert (config.max_in_flight, config.max_queue, config.default_deadline_s, config.max_deadline_s) == (3, 0, 20, 40)
    assert (config.max_message_bytes, config.max_body_bytes) == (1000, 2000)
    assert (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file, config.auth_token_file) == \
        ("c.pem", "k.pem", "ca.pem", "t")
    toml = tmp_path / "serve.toml"
    toml.write_text("[serve]\nmax_in_flight = 4\nmax_queue = 9\n")
    config = load_config(toml, {}, environ={"MOFSERVE_MAX_QUEUE": "5", "MOFSERVE_DEFAULT_DEADLINE_S": "7.5"})
    assert (config.max_in_flight, config.max_queue, config.default_deadline_s) == (4, 5, 7.5)
    defaults = ServeConfig()
    assert AdmissionLimits(defaults.max_in_flight, defaults.max_queue, defaults.default_deadline_s,
                           defaults.max_deadline_s) == AdmissionLimits()  # one set of defaults
    assert not hasattr(args, "auth_token")  # no flag for the secret itself: a command line is public
