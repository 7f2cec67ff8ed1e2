"""The closed- and open-loop load generator of ``mofserve bench load`` (``benchmarks/load.py``).

Why a module of its own: the loops that send the requests and time them (``LoadRunner``: closed-loop
concurrency points, open-loop Poisson rate points with ``client_overload`` shedding, warm-up, image
top-up, Triton's metrics and the CPU used per point) are the part of the load benchmark that
``benchmarks/soak.py`` drives too; ``load.py`` keeps the command (target, ``LoadConfig``, flags,
report). A runner reads its settings from a ``load.LoadConfig`` and sends through a
``benchmarks/transports.py`` transport; the images come from ``workload.ImagePool``.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import math
import time
import urllib.request
from typing import TYPE_CHECKING

import numpy as np

from mofserve.core.machine import cpu_snapshot, cpu_usage

from .stats import (
    ImagePicker,
    first_token_ms,
    parse_prometheus,
    poisson_arrivals,
    sample_modes,
    summarise_point,
    triton_delta,
)
from .transports import RequestFailed
from .workload import ImagePool, Progress

if TYPE_CHECKING:
    from .load import LoadConfig


class LoadRunner:
    def __init__(self, config: LoadConfig, transport, images: ImagePool, progress: Progress | None = None) -> None:
        self.config = config
        self.transport = transport
        self.images = images
        self.picker = ImagePicker(max(len(images), 1), config.repeat_ratio, seed=config.seed)
        self.mode_rng = np.random.default_rng([config.seed, 1])
        self.progress = progress or Progress(config.progress)
        self.in_flight = 0
        self._live: list[dict] = []

    # one request
    def _choose(self) -> tuple[int, bool, str]:
        self.picker.size = len(self.images)
        index, repeated = self.picker.pick()
        mode = sample_modes(self.config.mix, 1, self.mode_rng)[0]
        return index, repeated, mode

    async def _one(self, t0: float, scheduled: float | None = None, reserved: bool = False) -> dict:
        """One request; ``reserved``: the caller already counted it in ``in_flight`` (the open loop
        counts a request when it creates its task, so that a loop running behind schedule, creating
        several tasks before any starts, still sheds beyond ``max_in_flight``)."""
        loop = asyncio.get_running_loop()
        index, repeated, mode = self._choose()
        start = loop.time() if scheduled is None else scheduled
        record = {"t_s": start - t0, "mode": str(mode), "image": index, "repeated": repeated, "ok": False,
                  "code": None, "ms": None, "timings": None}
        if not reserved:
            self.in_flight += 1
        try:
            sent = loop.time()
            answer = await self.transport.ask(index, mode)
            record["timings"] = answer["timings"]
            for key in ("completion_tokens", "prompt_tokens"):
                if answer.get(key) is not None:
                    record[key] = answer[key]
            if answer.get("deltas"):  # times from the request's start (an open loop's scheduled arrival)
                offset = (sent - start) * 1e3
                record["deltas"] = [[round(ms + offset, 3), n] for ms, n in answer["deltas"]]
            record["ok"] = True
        except RequestFailed as error:
            record["code"] = error.code
        except Exception as error:
            record["code"] = f"client_error {type(error).__name__}"
        finally:
            self.in_flight -= 1
        record["ms"] = (loop.time() - start) * 1000.0
        if record["ok"]:
            record["ttft_ms"] = first_token_ms(record["ms"], record.get("deltas"), record["timings"])
        self._live.append(record)
        return record

    async def _ticker(self, label: str, t0: float, cap: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.5)
            self.progress.show(self._status(label, loop.time() - t0, cap))

    def _status(self, label: str, elapsed: float, cap: float) -> str:
        ok = [r["ms"] for r in self._live if r["ok"]]
        errors = sum(1 for r in self._live if not r["ok"])
        p50 = f"{float(np.median(ok)):.0f}ms" if ok else "-"
        return (f"[load] {label} {elapsed:5.1f}/{cap:g}s done {len(self._live)} ok {len(ok)} err {errors} "
                f"in-flight {self.in_flight} p50 {p50}")

    async def closed_phase(self, concurrency: int, seconds: float, count: int | None,
                           label: str) -> tuple[list[dict], float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        end = t0 + seconds
        issued = 0
        records: list[dict] = []
        self._live = records

        async def worker() -> None:
            nonlocal issued
            while loop.time() < end and (count is None or issued < count):
                issued += 1
                await self._one(t0)

        ticker = asyncio.create_task(self._ticker(label, t0, seconds))
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            ticker.cancel()
        return records, loop.time() - t0

    async def open_phase(self, rate: float, seconds: float, count: int | None, seed: int,
                         label: str) -> tuple[list[dict], float]:
        loop = asyncio.get_running_loop()
        arrivals = poisson_arrivals(rate, duration=seconds, count=count, seed=seed)
        t0 = loop.time()
        records: list[dict] = []
        self._live = records
        tasks = []
        ticker = asyncio.create_task(self._ticker(label, t0, seconds))
        try:
            for arrival in arrivals:
                delay = t0 + arrival - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.in_flight >= self.config.max_in_flight:
                    index, repeated, mode = self._choose()
                    records.append({"t_s": arrival, "mode": str(mode), "image": index, "repeated": repeated,
                                    "ok": False, "code": "client_overload", "ms": None, "timings": None})
                    continue
                self.in_flight += 1
                tasks.append(asyncio.create_task(self._one(t0, scheduled=t0 + arrival, reserved=True)))
            await asyncio.gather(*tasks)
        finally:
            ticker.cancel()
        return records, loop.time() - t0

    async def _scrape(self) -> dict | str | None:
        """Triton's metrics now (parsed), an error message, or None when no URL was given."""
        url = self.config.triton_metrics
        if not url:
            return None

        def fetch() -> str:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read().decode()

        try:
            return parse_prometheus(await asyncio.to_thread(fetch))
        except OSError as error:
            return f"{type(error).__name__}: {error}"

    def _top_up(self, expected: int) -> None:
        """Make enough fresh images for ``expected`` more requests before a timed phase starts."""
        fresh_needed = math.ceil(expected * (1 - self.config.repeat_ratio)) + 8
        unsent = len(self.images) - len(self.picker.sent)
        if unsent < fresh_needed:
            self.images.ensure(min(len(self.images) + fresh_needed - unsent, len(self.images) + 2000))

    def _expected(self, rps: float, seconds: float, count: int | None) -> int:
        guess = math.ceil(rps * seconds * 1.3)
        return min(guess, count) if count is not None else guess

    async def run_point(self, kind: str, value: float, best_rps: float) -> dict:
        c = self.config
        label = f"c={value:g}" if kind == "concurrency" else f"rate={value:g}/s"
        cap = c.time_cap_s
        rps_guess = value if kind == "rate" else max(best_rps, 1.0) * 1.5
        if c.warmup_s > 0:
            self._top_up(self._expected(rps_guess, c.warmup_s, None))
            if kind == "concurrency":
                warm, elapsed = await self.closed_phase(int(value), c.warmup_s, None, label + " warm-up")
                rps_guess = max(rps_guess, len(warm) / elapsed if elapsed > 0 else 0.0)
            else:
                await self.open_phase(value, c.warmup_s, None, c.seed + 1000, label + " warm-up")
        # images for the timed phase are made now, not while it runs (made at ~10 ms each)
        self._top_up(self._expected(rps_guess, cap, c.requests))
        before = await self._scrape()
        cpu_before = cpu_snapshot()
        started = time.time()
        if kind == "concurrency":
            records, elapsed = await self.closed_phase(int(value), cap, c.requests, label)
        else:
            records, elapsed = await self.open_phase(value, cap, c.requests, c.seed + int(value * 1000), label)
        cpu_after = cpu_snapshot()
        after = await self._scrape()
        self.progress.show(self._status(label, elapsed, cap), final=True)
        point = {"kind": kind, "value": value, "started": _dt.datetime.fromtimestamp(started, _dt.UTC).isoformat(),
                 **summarise_point(records, elapsed)}
        if kind == "rate":
            point["offered_rps"] = value
        if cpu_before is not None and cpu_after is not None:  # this process tree (with --serve, the server too)
            point["cpu"] = cpu_usage(cpu_before, cpu_after)
        if isinstance(before, dict) and isinstance(after, dict):
            point["triton"] = triton_delta(before, after)
        elif c.triton_metrics:
            point["triton"] = {"error": before if isinstance(before, str) else after}
        point["records"] = records
        return point

    async def run(self) -> list[dict]:
        points: list[dict] = []
        best = 0.0
        for concurrency in self.config.concurrency:
            point = await self.run_point("concurrency", concurrency, best)
            best = max(best, point["throughput_rps"] if math.isfinite(point["throughput_rps"]) else 0.0)
            points.append(point)
        for rate in self.config.rates:
            points.append(await self.run_point("rate", rate, best))
        return points
