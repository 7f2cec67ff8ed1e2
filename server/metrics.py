"""Prometheus metrics of the front-end (both transports share one registry).

Triton's own metrics stay on Triton's metrics port; these say what users saw: requests by
method, mode and status, end-to-end latency, the per-stage breakdown reported by the ensembles
(the language model's queue, prefill and decode included), the time to the first token, tokens
read and written, and requests in flight.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STAGES = ("preprocess", "clip", "dinov2", "fusion", "llm", "llm_queue", "prefill", "decode")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class FrontendMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("mofserve_requests", "Requests answered, by transport, method, mode and status",
                                ["transport", "method", "mode", "status"], registry=self.registry)
        self.latency = Histogram("mofserve_request_seconds", "End-to-end request latency in the front-end",
                                 ["transport", "method", "mode"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stages = Histogram("mofserve_stage_seconds", "Per-stage time reported by the Triton ensembles",
                                ["stage", "mode"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("mofserve_time_to_first_token_seconds", "Time from the front-end's call "
                                     "to the first generated token, by transport and mode", ["transport", "mode"],
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("mofserve_tokens", "Tokens the language model read (prompt) and wrote "
                              "(completion) for answered questions, by mode", ["mode", "kind"], registry=self.registry)
        self.in_flight = Gauge("mofserve_in_flight_requests", "Requests being served now", ["transport"],
                               registry=self.registry)
        # admission control (server/admission.py): both transports share one queue
        self.admission_executing = Gauge("mofserve_admission_executing", "Admitted requests executing now "
                                         "(at most max_in_flight)", registry=self.registry)
        self.admission_queued = Gauge("mofserve_admission_queue_depth", "Requests waiting for a slot "
                                      "(at most max_queue)", registry=self.registry)
        self.admission_rejected = Counter("mofserve_admission_rejected", "Requests refused by admission control, "
                                          "by transport and reason (queue_full, deadline)", ["transport", "reason"],
                                          registry=self.registry)
        self.admission_wait = Histogram("mofserve_admission_wait_seconds", "Time queued before a slot was free",
                                        buckets=LATENCY_BUCKETS, registry=self.registry)
        self.auth_failures = Counter("mofserve_auth_failures", "Requests refused for a missing or wrong bearer "
                                     "token, by transport", ["transport"], registry=self.registry)

    @contextmanager
    def track(self, transport: str, method: str, mode: str = "") -> Iterator[dict[str, str]]:
        """Times one request; the caller sets ``outcome["status"]`` (default "ok", "error" on exception)."""
        outcome = {"status": "ok"}
        started = time.perf_counter()
        self.in_flight.labels(transport).inc()
        try:
            yield outcome
        except BaseException:
            if outcome["status"] == "ok":
                outcome["status"] = "error"
            raise
        finally:
            self.in_flight.labels(transport).dec()
            self.requests.labels(transport, method, mode, outcome["status"]).inc()
            self.latency.labels(transport, method, mode).observe(time.perf_counter() - started)

    def observe_stages(self, mode: str, timings) -> None:
        """Record an answer's per-stage milliseconds (``StageTimings``)."""
        for stage in STAGES:
            value = getattr(timings, f"{stage}_ms", 0.0)
            if value > 0:
                self.stages.labels(stage, mode).observe(value / 1e3)

    def observe_answer(self, transport: str, answer) -> None:
        """Record an ``Answer``: its stages, its time to the first token and its token counts."""
        mode = answer.mode.value
        self.observe_stages(mode, answer.timings)
        if answer.timings.time_to_first_token_ms > 0:
            self.first_token.labels(transport, mode).observe(answer.timings.time_to_first_token_ms / 1e3)
        self.tokens.labels(mode, "prompt").inc(answer.usage.prompt_tokens)
        self.tokens.labels(mode, "completion").inc(answer.usage.completion_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
