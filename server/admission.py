"""Admission control shared by both transports: bounded concurrency, a bounded FIFO queue, fast
rejection with retry advice, and the deadline every admitted request runs under.

Why: without it every request that arrives is forwarded to Triton, whose queues grow without
bound under overload, so latency grows for everyone until clients time out (and abandoned
Triton calls keep running, see ``engine._infer``). Here at most ``max_in_flight`` requests
execute, at most ``max_queue`` wait in arrival order, and anything beyond is refused at once with
``resource_exhausted`` (gRPC RESOURCE_EXHAUSTED, HTTP 429) and an estimate of when to retry, so
a client (or a load balancer) can back off or go elsewhere instead of piling on.

Cheap requests (GetServerInfo, health, ``/v1/models``, ``/metrics``) do not pass through here.

Each request gets a deadline: the caller's (a gRPC deadline, HTTP's ``X-Request-Timeout``),
clamped to ``max_deadline_s``, or ``default_deadline_s`` when it sends none. Time spent queued
counts against it; a request whose deadline passes while queued leaves the queue with
``deadline_exceeded``. ``Admission.admit`` yields the absolute deadline (``time.monotonic()``) for
the engine's Triton timeout.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

from .engine import EngineError

#: Service time assumed before the first request has finished (seconds).
INITIAL_SERVICE_S = 1.0
#: Weight of the newest service time in the moving average.
EMA_WEIGHT = 0.2
#: Retry advice is clamped to this range (seconds).
MIN_RETRY_S = 0.05
MAX_RETRY_S = 60.0


@dataclass(frozen=True)
class AdmissionLimits:
    """The admission settings (``mofserve serve``: docs/api.md, docs/reliability.md)."""

    max_in_flight: int = 8
    max_queue: int = 32
    default_deadline_s: float = 300.0
    max_deadline_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight: must be >= 1, got {self.max_in_flight}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue: must be >= 0, got {self.max_queue}")
        if not (math.isfinite(self.default_deadline_s) and self.default_deadline_s > 0):
            raise ValueError(f"default_deadline_s: must be a positive number, got {self.default_deadline_s}")
        if not (math.isfinite(self.max_deadline_s) and self.max_deadline_s >= self.default_deadline_s):
            raise ValueError(f"max_deadline_s: must be >= default_deadline_s ({self.default_deadline_s}), "
                             f"got {self.max_deadline_s}")


class Overloaded(EngineError):
    """``resource_exhausted`` with retry advice: ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__("resource_exhausted", message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after_ms(self) -> int:
        return max(1, math.ceil(self.retry_after_s * 1e3))

    @property
    def retry_after_header(self) -> str:
        """HTTP ``Retry-After``: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


def retry_after(error: EngineError) -> float | None:
    """The retry advice an error carries (seconds), if any."""
    return error.retry_after_s if isinstance(error, Overloaded) else None


class Admission:
    """At most ``max_in_flight`` requests executing and ``max_queue`` waiting (FIFO).

    Use on one event loop: ``async with admission.admit(timeout, "grpc") as deadline: ...``. A
    slot is released when the block exits however it exits (return, exception, cancellation);
    a freed slot passes straight to the oldest waiter, so nobody overtakes the queue.
    ``metrics`` (a ``FrontendMetrics``) is optional.
    """

    def __init__(self, limits: AdmissionLimits | None = None, metrics=None) -> None:
        self.limits = limits or AdmissionLimits()
        self.metrics = metrics
        self._executing = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._service_s = INITIAL_SERVICE_S  # moving average of how long a slot is held

    # ---- state -----------------------------------------------------------------------------

    @property
    def executing(self) -> int:
        return self._executing

    @property
    def queued(self) -> int:
        return len(self._waiters)  # a waiter leaves the deque when granted, timed out or cancelled

    @property
    def service_s(self) -> float:
        """The moving average of recent service times (seconds)."""
        return self._service_s

    def retry_after_s(self, position: int | None = None) -> float:
        """When a slot is likely free for a request at queue ``position`` (default: behind everyone
        queued): the average service time times the waves of ``max_in_flight`` ahead of it."""
        ahead = self.queued if position is None else position
        waves = ahead // self.limits.max_in_flight + 1
        return min(max(self._service_s * waves, MIN_RETRY_S), MAX_RETRY_S)

    def timeout(self, requested: float | None) -> float:
        """The deadline a request runs under (seconds from now): ``requested`` clamped to
        ``max_deadline_s``, or ``default_deadline_s`` when the caller set none."""
        if requested is None:
            return self.limits.default_deadline_s
        return min(float(requested), self.limits.max_deadline_s)

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.admission_executing.set(self._executing)
            self.metrics.admission_queued.set(self.queued)

    def _reject(self, transport: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.admission_rejected.labels(transport, reason).inc()

    # ---- slots -----------------------------------------------------------------------------

    def _release(self) -> None:
        """Gives the slot to the oldest live waiter, or frees it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands; _executing stays
                self._publish()
                return
        self._executing -= 1
        self._publish()

    def _overloaded(self) -> Overloaded:
        lim = self.limits
        advice = self.retry_after_s()
        return Overloaded(f"server busy: {self._executing} requests in flight (max_in_flight={lim.max_in_flight}) "
                          f"and {self.queued} queued (max_queue={lim.max_queue}); retry after {advice:.1f} s",
                          advice)

    async def _acquire(self, timeout: float, transport: str) -> None:
        if timeout <= 0:
            self._reject(transport, "deadline")
            raise EngineError("deadline_exceeded", "deadline: expired before the request was admitted")
        if self._executing < self.limits.max_in_flight and not self.queued:
            self._executing += 1
            self._publish()
            return
        if self.queued >= self.limits.max_queue:
            self._reject(transport, "queue_full")
            raise self._overloaded()
        position = self.queued
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._publish()
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                self._release()  # granted just as the wait ended: hand the slot on
            else:
                waiter.cancel()
                with suppress(ValueError):
                    self._waiters.remove(waiter)
                self._publish()
            if isinstance(error, TimeoutError):
                self._reject(transport, "deadline")
                raise EngineError("deadline_exceeded", f"deadline: expired after {time.monotonic() - started:.3f} s "
                                                       f"in the admission queue ({position} ahead of it, "
                                                       f"max_in_flight={self.limits.max_in_flight})") from None
            raise
        finally:
            if self.metrics is not None:
                self.metrics.admission_wait.observe(time.monotonic() - started)

    @asynccontextmanager
    async def admit(self, timeout: float | None, transport: str = "") -> AsyncIterator[float]:
        """Holds a slot for the block; yields the request's absolute deadline (``time.monotonic()``).

        ``timeout`` is what the caller asked for (None: the default deadline); raises
        ``Overloaded`` when the queue is full and ``EngineError("deadline_exceeded")`` when the
        deadline passes before a slot frees up.
        """
        timeout = self.timeout(timeout)
        deadline = time.monotonic() + timeout
        await self._acquire(timeout, transport)
        started = time.monotonic()
        try:
            yield deadline
        finally:
            held = time.monotonic() - started
            self._service_s += EMA_WEIGHT * (held - self._service_s)
            self._release()


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (``time.monotonic()``), never negative."""
    return max(deadline - time.monotonic(), 0.0)
