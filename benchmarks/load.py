"""``mofserve bench load``: a load generator for a running mofserve front-end (gRPC or HTTP).

Against ``grpc://HOST:PORT`` (``AsyncMofServeClient.ask``) or ``http://HOST:PORT`` (aiohttp, the
OpenAI-compatible ``POST /v1/chat/completions``) it runs, one point after another:

* **closed-loop concurrency sweeps** (``--concurrency 1 2 4 8``): C asyncio workers, each sending
  its next request as soon as its previous one is answered;
* **open-loop rate sweeps** (``--rate 0.5 1 2``): Poisson arrivals at R requests/s (seeded), each
  request sent at its arrival time whatever is in flight; its latency counts from the scheduled
  arrival, so a late client does not hide queueing (no coordinated omission). More than
  ``--max-in-flight`` outstanding requests count as ``client_overload`` errors instead of being sent.

Each point first runs ``--warmup`` seconds at the same load (not recorded), then is timed for
``--duration`` seconds and/or ``--requests`` requests (requests in flight at the end are awaited
and counted); every request has a ``--timeout``. Only the address given is contacted.

Every request draws its fusion mode from ``--mix`` and its image from a pool of deterministic
variants (crops, flips, colour jitter; ``benchmarks.frontend.make_variant``) of the real
scikit-image photos of ``mofserve.core.samples``: with probability ``--repeat-ratio`` an image
already sent (its encoder features are then in the server's feature cache), else a new one. The
pool is shared by all points, so an image is fresh only once per run.

Per point: throughput (successes / (time until the last answer)), latency p50/p90/p95/p99/max of
the successes, errors by code, the mean of the server's per-stage timings that the answers carry
(overall, per mode, fresh vs repeated image), and the raw records. See ``benchmarks/report.py``
for the files written (JSON, Markdown, PNG plots).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as _dt
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from .stats import (
    DEFAULT_MIX,
    ImagePicker,
    latency_summary,
    parse_mix,
    parse_prometheus,
    poisson_arrivals,
    sample_modes,
    stage_means,
    summarise_point,
    triton_delta,
)

QUESTION = "Is the dog facing left or right?"
OPTIONS = "(a) Left (b) Right"
MAX_NEW_TOKENS = 8
DEFAULT_CONCURRENCY = (1, 2, 4, 8)
DEFAULT_DURATION_S = 10.0
MAX_POINT_S = 600.0  # a point started with --requests only stops after this long anyway
DEFAULT_TIMEOUT_S = 60.0
MAX_IN_FLIGHT = 256
FIRST_POOL = 32  # images made before the first point; later points top up from the rate seen
# In-process baselines run before the sweep (issue 4's targets, `small` profile, ratios of one run):
BASELINES = ("eager", "exported")
DEFAULT_BASELINE_REQUESTS = 8
THROUGHPUT_TARGET = 2.0  # serving throughput at the best concurrency >= 2x the naive eager baseline's
P50_TARGET = 1.15  # p50 at concurrency 1 (fresh images) <= 1.15x the exported in-process pipeline's p50


class RequestFailed(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Target:
    scheme: str  # "grpc" or "http"
    address: str  # host:port

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"


def parse_target(text: str) -> Target:
    """``grpc://HOST:PORT``, ``http://HOST:PORT`` or a bare ``HOST:PORT`` (gRPC)."""
    if "://" not in text:
        text = "grpc://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("grpc", "http"):
        raise ValueError(f"target: scheme must be grpc:// or http://, got {parts.scheme!r}")
    if not parts.hostname or parts.port is None:
        raise ValueError(f"target: give HOST:PORT, got {text!r}")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"target: give only scheme://HOST:PORT, got {text!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return Target(parts.scheme, f"{host}:{parts.port}")


@dataclass
class LoadConfig:
    target: Target
    concurrency: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    duration_s: float | None = DEFAULT_DURATION_S
    requests: int | None = None
    warmup_s: float = 2.0
    mix: dict[str, float] = field(default_factory=lambda: parse_mix(DEFAULT_MIX))
    repeat_ratio: float = 0.3
    question: str = QUESTION
    options: str = OPTIONS
    max_new_tokens: int = MAX_NEW_TOKENS
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_in_flight: int = MAX_IN_FLIGHT
    seed: int = 0
    progress: bool = True
    triton_metrics: str | None = None  # Triton's Prometheus URL: per-model queue / compute per point
    baselines: list[str] = field(default_factory=list)  # "eager" and/or "exported", run before the sweep
    baseline_requests: int = DEFAULT_BASELINE_REQUESTS
    baseline_profile: str | None = None  # None: the profile the server reports

    def __post_init__(self) -> None:
        if not self.concurrency and not self.rates:
            self.concurrency = list(DEFAULT_CONCURRENCY)
        if any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency: must be >= 1, got {self.concurrency}")
        if any(not r > 0 for r in self.rates):
            raise ValueError(f"rate: must be > 0 requests/s, got {self.rates}")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests: must be >= 1, got {self.requests}")
        if self.duration_s is None:
            if self.requests is None:
                self.duration_s = DEFAULT_DURATION_S
        elif not 0 < self.duration_s <= MAX_POINT_S:
            raise ValueError(f"duration: must be within (0, {MAX_POINT_S:g}] s, got {self.duration_s}")
        if self.warmup_s < 0:
            raise ValueError(f"warmup: must be >= 0, got {self.warmup_s}")
        if not 0 <= self.repeat_ratio <= 1:
            raise ValueError(f"repeat-ratio: must be within [0, 1], got {self.repeat_ratio}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout: must be > 0, got {self.timeout_s}")
        if self.triton_metrics is not None and not self.triton_metrics.startswith("http://"):
            raise ValueError(f"triton-metrics: give http://HOST:PORT/metrics, got {self.triton_metrics!r}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"baseline: unknown {unknown}; expected some of {', '.join(BASELINES)}")
        self.baselines = list(dict.fromkeys(self.baselines))
        if not 1 <= self.baseline_requests <= 1000:
            raise ValueError(f"baseline-requests: must be within [1, 1000], got {self.baseline_requests}")

    @property
    def time_cap_s(self) -> float:
        return self.duration_s if self.duration_s is not None else MAX_POINT_S

    def to_dict(self) -> dict:
        out = asdict(self)
        out["target"] = self.target.url
        return out


# --------------------------------------------------------------------------------------------
# Images


class ImagePool:
    """Encoded JPEG variants of the sample photos, made on demand (never during a timed phase)."""

    def __init__(self, seed: int | None = None) -> None:
        from mofserve.core.samples import sample_photos

        from .frontend import VARIANT_SEED

        self.photos = sample_photos()
        self.seed = VARIANT_SEED if seed is None else seed
        self.images: list[bytes] = []

    def ensure(self, count: int) -> None:
        from .frontend import make_variant, variant_params

        while len(self.images) < count:
            i = len(self.images)
            self.images.append(make_variant(self.photos[i % len(self.photos)],
                                            variant_params(i, len(self.photos), self.seed)))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> bytes:
        return self.images[index]


# --------------------------------------------------------------------------------------------
# Transports


class GrpcTransport:
    name = "grpc"

    def __init__(self, target: Target, config: LoadConfig, images: ImagePool) -> None:
        self.target, self.config, self.images = target, config, images
        self.client = None

    async def open(self) -> None:
        from mofserve.clients import AsyncMofServeClient

        # no client-side retries: a failure is counted, not hidden
        self.client = AsyncMofServeClient(self.target.address, timeout=self.config.timeout_s, retries=False)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def info(self) -> dict:
        from mofserve.clients import MofServeError

        try:
            health = await self.client.health(timeout=10)
            info = await self.client.server_info(timeout=10)
        except MofServeError as error:
            raise RuntimeError(f"{self.target.url}: {error.code.name}: {error.message}") from None
        if health != "SERVING":
            raise RuntimeError(f"{self.target.url}: health is {health}, not SERVING")
        return {"health": health, "version": info.version, "profile": info.provenance.profile,
                "random_weights": info.provenance.random_weights, "notice": info.provenance.notice,
                "model_versions": info.provenance.model_versions, "modes": info.modes,
                "default_mode": info.default_mode, "default_alpha": info.default_alpha, "limits": info.limits}

    async def ask(self, index: int, mode: str) -> dict[str, float]:
        from mofserve.clients import MofServeError

        c = self.config
        try:
            result = await self.client.ask(self.images[index], c.question, options=c.options or None, mode=mode,
                                           max_new_tokens=c.max_new_tokens)
        except MofServeError as error:
            raise RequestFailed(error.code.name) from None
        return asdict(result.timings)


class HttpTransport:
    name = "http"

    def __init__(self, target: Target, config: LoadConfig, images: ImagePool) -> None:
        self.target, self.config, self.images = target, config, images
        self.session = None
        self._urls: dict[int, str] = {}

    async def open(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            base_url=f"http://{self.target.address}", timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            connector=aiohttp.TCPConnector(limit=0))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def info(self) -> dict:
        import aiohttp

        try:
            async with self.session.get("/healthz") as response:
                health = await response.json()
            async with self.session.get("/v1/models") as response:
                models = await response.json()
        except (TimeoutError, aiohttp.ClientError) as error:
            raise RuntimeError(f"{self.target.url}: {type(error).__name__}: {error}") from None
        if health.get("status") != "ok":
            raise RuntimeError(f"{self.target.url}: /healthz says {health}")
        return {"health": health.get("status"), "profile": health.get("profile"),
                "models": [m.get("id") for m in models.get("data", [])], **{
                    k: v for k, v in health.items() if k not in ("status", "profile")}}

    def data_url(self, index: int) -> str:
        url = self._urls.get(index)
        if url is None:
            url = self._urls[index] = "data:image/jpeg;base64," + base64.b64encode(self.images[index]).decode()
        return url

    def body(self, index: int, mode: str) -> dict:
        c = self.config
        body = {"model": f"mofserve-{mode}", "max_tokens": c.max_new_tokens,
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": c.question},
                    {"type": "image_url", "image_url": {"url": self.data_url(index)}}]}]}
        if c.options:
            body["options"] = c.options
        return body

    async def ask(self, index: int, mode: str) -> dict[str, float]:
        import aiohttp

        try:
            async with self.session.post("/v1/chat/completions", json=self.body(index, mode)) as response:
                payload = await response.json(content_type=None)
                if response.status != 200:
                    code = (payload.get("error") or {}).get("code") if isinstance(payload, dict) else None
                    raise RequestFailed(f"{response.status} {code or 'error'}")
        except TimeoutError:
            raise RequestFailed("client_timeout") from None
        except aiohttp.ClientError as error:
            raise RequestFailed(f"connection_error {type(error).__name__}") from None
        except ValueError:
            raise RequestFailed("bad_response") from None
        return dict(payload.get("mofserve", {}).get("timings", {}))


def make_transport(target: Target, config: LoadConfig, images: ImagePool):
    return (GrpcTransport if target.scheme == "grpc" else HttpTransport)(target, config, images)


# --------------------------------------------------------------------------------------------
# The load loops


class Progress:
    """One status line on stderr: rewritten in place on a terminal, every few seconds otherwise."""

    def __init__(self, enabled: bool, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0

    def show(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
            self.stream.flush()
        elif final or now - self._last >= 5.0:
            self._last = now
            print(text, file=self.stream, flush=True)


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
            record["timings"] = await self.transport.ask(index, mode)
            record["ok"] = True
        except RequestFailed as error:
            record["code"] = error.code
        except Exception as error:
            record["code"] = f"client_error {type(error).__name__}"
        finally:
            self.in_flight -= 1
        record["ms"] = (loop.time() - start) * 1000.0
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
            import urllib.request

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
        started = time.time()
        if kind == "concurrency":
            records, elapsed = await self.closed_phase(int(value), cap, c.requests, label)
        else:
            records, elapsed = await self.open_phase(value, cap, c.requests, c.seed + int(value * 1000), label)
        after = await self._scrape()
        self.progress.show(self._status(label, elapsed, cap), final=True)
        point = {"kind": kind, "value": value, "started": _dt.datetime.fromtimestamp(started, _dt.UTC).isoformat(),
                 **summarise_point(records, elapsed)}
        if kind == "rate":
            point["offered_rps"] = value
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


# --------------------------------------------------------------------------------------------
# Baselines in the same run: the pipeline with no server, on the same images and questions


def baseline_plan(config: LoadConfig, count: int | None = None) -> list[tuple[int, str]]:
    """(image index, mode) of each baseline request: the pool's first images, which the sweep then
    sends as its first fresh images, and modes drawn from the sweep's mix (own seeded stream)."""
    n = config.baseline_requests if count is None else count
    modes = sample_modes(config.mix, n, np.random.default_rng([config.seed, 2]))
    return [(i, str(mode)) for i, mode in enumerate(modes)]


def _load_pipeline(name: str, profile_name: str):
    from mofserve.core.checkpoints import resolve_profile
    from mofserve.core.profiles import get_profile
    from mofserve.export.pipeline import export_profile

    from .frontend import EagerPipeline, InProcessPipeline

    profile = get_profile(profile_name)
    if name == "eager":
        return EagerPipeline(profile, resolve_profile(profile))
    return InProcessPipeline(export_profile(profile, target="cpu", log=lambda m: None))


def run_baseline(name: str, config: LoadConfig, images: ImagePool, profile_name: str,
                 progress: Progress | None = None) -> dict:
    """One baseline: load it, answer one untimed request per mode, then the plan's requests one at a
    time (wall time per request; throughput = requests / total time). torch's thread count is put
    back afterwards (the exported pipeline sets the LM's, as the served model does)."""
    import gc

    import torch

    progress = progress or Progress(config.progress)
    plan = baseline_plan(config)
    images.ensure(len(plan) + 1)
    threads = torch.get_num_threads()
    try:
        t0 = time.perf_counter()
        pipeline = _load_pipeline(name, profile_name)
        load_s = time.perf_counter() - t0
        warm_image = images[len(plan)]  # not among the timed ones
        for mode in dict.fromkeys(m for _, m in plan):
            pipeline.answer(warm_image, mode, config.question, config.options, config.max_new_tokens)
        records = []
        t0 = time.perf_counter()
        for index, mode in plan:
            started = time.perf_counter()
            answer, stages = pipeline.answer(images[index], mode, config.question, config.options,
                                             config.max_new_tokens)
            records.append({"image": index, "mode": mode, "ms": (time.perf_counter() - started) * 1e3,
                            "stages": stages, "chosen": answer.chosen_option, "answer": answer.text})
            progress.show(f"baseline {name}: {len(records)}/{len(plan)} requests")
        elapsed = time.perf_counter() - t0
        label, runtime, precision = pipeline.label, pipeline.runtime, pipeline.precision
        del pipeline
        gc.collect()
    finally:
        torch.set_num_threads(threads)
    latency = latency_summary([r["ms"] for r in records])
    progress.show(f"baseline {name} ({label}): {len(records) / elapsed:.2f} req/s, p50 {latency['p50']:.1f} ms",
                  final=True)
    return {"name": name, "label": label, "runtime": runtime, "precision": precision, "profile": profile_name,
            "load_s": load_s, "requests": len(records), "elapsed_s": elapsed,
            "throughput_rps": len(records) / elapsed if elapsed > 0 else math.nan, "latency_ms": latency,
            "stages_ms": stage_means(r["stages"] for r in records), "records": records}


def run_baselines(config: LoadConfig, images: ImagePool, profile_name: str) -> dict[str, dict]:
    return {name: run_baseline(name, config, images, profile_name) for name in config.baselines}


def _ratio(numerator: float | None, denominator: float | None) -> float:
    if numerator is None or denominator is None or not denominator > 0 or not math.isfinite(numerator):
        return math.nan
    return numerator / denominator


def baseline_ratios(baselines: Mapping[str, Mapping], points: Sequence[Mapping]) -> dict:
    """The issue's two same-run ratios with MET / MISSED (None where a side is missing):

    * ``throughput``: serving throughput at the best concurrency / the eager baseline's (>= 2x);
    * ``p50_c1``: p50 at concurrency 1 of the FRESH images (a repeated image skips the encoders, the
      in-process pipeline has no cache) / the exported in-process pipeline's p50 (<= 1.15x).
    Plus, for reading them, the serving / exported throughput and the all-request p50 ratio."""
    closed = [p for p in points if p["kind"] == "concurrency" and p["ok"] > 0]
    best = max(closed, key=lambda p: p["throughput_rps"], default=None)
    c1 = next((p for p in closed if p["value"] == 1), None)
    fresh_c1 = [r["ms"] for r in (c1 or {}).get("records", ()) if r["ok"] and not r["repeated"]]
    eager, exported = baselines.get("eager"), baselines.get("exported")

    def verdict(value: float, target: float, at_least: bool) -> str | None:
        if not math.isfinite(value):
            return None
        return "MET" if (value >= target if at_least else value <= target) else "MISSED"

    throughput = _ratio(best["throughput_rps"] if best else None, eager["throughput_rps"] if eager else None)
    p50_fresh = latency_summary(fresh_c1)["p50"] if fresh_c1 else math.nan
    p50 = _ratio(p50_fresh, exported["latency_ms"]["p50"] if exported else None)
    return {
        "throughput": {"value": throughput, "target": THROUGHPUT_TARGET, "at_least": True,
                       "verdict": verdict(throughput, THROUGHPUT_TARGET, True),
                       "serving_rps": best["throughput_rps"] if best else None,
                       "best_concurrency": best["value"] if best else None,
                       "eager_rps": eager["throughput_rps"] if eager else None},
        "p50_c1": {"value": p50, "target": P50_TARGET, "at_least": False, "verdict": verdict(p50, P50_TARGET, False),
                   "serving_p50_ms": p50_fresh, "fresh_requests": len(fresh_c1),
                   "exported_p50_ms": exported["latency_ms"]["p50"] if exported else None},
        "throughput_vs_exported": _ratio(best["throughput_rps"] if best else None,
                                         exported["throughput_rps"] if exported else None),
        "p50_c1_all_vs_exported": _ratio(c1["latency_ms"]["p50"] if c1 else None,
                                         exported["latency_ms"]["p50"] if exported else None),
    }


# --------------------------------------------------------------------------------------------
# Entry points


async def run_load(config: LoadConfig, images: ImagePool | None = None) -> dict:
    """Run every point of ``config`` against its target and return the report (not yet written)."""
    from .report import build_report

    images = images or ImagePool()
    images.ensure(max(FIRST_POOL, config.baseline_requests + 1 if config.baselines else 0))
    transport = make_transport(config.target, config, images)
    await transport.open()
    baselines: dict[str, dict] = {}
    try:
        server = await transport.info()
        began = time.time()
        if config.baselines:
            profile = config.baseline_profile or server.get("profile")
            if not profile:
                raise RuntimeError("baseline: the server did not say its profile; give --baseline-profile")
            # CPU-bound and blocking: off the loop, which may also serve the front-end (tests)
            baselines = await asyncio.to_thread(run_baselines, config, images, profile)
        runner = LoadRunner(config, transport, images)
        points = await runner.run()
    finally:
        await transport.close()
    return build_report(config, server, points, began=began, images=len(images), baselines=baselines or None)


def parse_ready(line: str) -> dict[str, str] | None:
    """``READY grpc=HOST:PORT http=http://HOST:PORT`` (``mofserve serve``) -> {"grpc": url, "http": url}."""
    if not line.startswith("READY "):
        return None
    fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
    if "grpc" not in fields or "http" not in fields:
        return None
    grpc_url = fields["grpc"] if "://" in fields["grpc"] else "grpc://" + fields["grpc"]
    return {"grpc": grpc_url, "http": fields["http"]}


def triton_metrics_url(log: str) -> str | None:
    """The Triton metrics URL that ``mofserve serve`` logs at start-up (``Triton metrics http://...``)."""
    import re

    found = re.findall(r"Triton metrics (http://\S+)", log)
    return found[-1] if found else None


def triton_grpc_address(log: str) -> str | None:
    """Triton's gRPC HOST:PORT that ``mofserve serve`` logs at start-up (``Triton gRPC HOST:PORT,``)."""
    import re

    found = re.findall(r"Triton gRPC ([^\s,]+)", log)
    return found[-1] if found else None


class ServeProcess:
    """``mofserve serve --profile P`` on free loopback ports in a child process: started, waited for
    until its ``READY`` line, stopped with SIGTERM (then SIGKILL after ``stop_timeout_s``). Its
    stderr goes to ``log_path``. The benchmark never imports the server."""

    def __init__(self, profile: str, log_path: Path, startup_timeout_s: float = 1800.0,
                 stop_timeout_s: float = 60.0) -> None:
        self.profile, self.log_path = profile, Path(log_path)
        self.startup_timeout_s, self.stop_timeout_s = startup_timeout_s, stop_timeout_s
        self.process = None
        self.endpoints: dict[str, str] | None = None
        self.triton_metrics: str | None = None
        self.triton_grpc: str | None = None

    def __enter__(self) -> ServeProcess:
        import subprocess
        import threading

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mofserve", "serve", "--profile", self.profile, "--host", "127.0.0.1",
             "--grpc-port", "0", "--http-port", "0"],
            stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
        ready = threading.Event()

        def read() -> None:  # keeps draining stdout so that the server never blocks on it
            for line in self.process.stdout:
                self._log.write(line)
                self._log.flush()
                found = parse_ready(line.strip())
                if found and self.endpoints is None:
                    self.endpoints = found
                    ready.set()
            ready.set()

        threading.Thread(target=read, name="serve-stdout", daemon=True).start()
        print(f"[load] starting mofserve serve --profile {self.profile} (log {self.log_path})", file=sys.stderr,
              flush=True)
        if not ready.wait(self.startup_timeout_s) or self.endpoints is None:
            self.__exit__(None, None, None)
            raise RuntimeError(f"mofserve serve --profile {self.profile} did not get ready "
                               f"(exit code {self.process.returncode}); see {self.log_path}")
        log_text = self.log_path.read_text(errors="replace")
        self.triton_metrics = triton_metrics_url(log_text)
        self.triton_grpc = triton_grpc_address(log_text)
        print(f"[load] server ready: {self.endpoints['grpc']} {self.endpoints['http']} (Triton metrics "
              f"{self.triton_metrics})", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        import subprocess

        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def default_out_dir(now: _dt.datetime | None = None) -> Path:
    now = now or _dt.datetime.now()
    return Path("results") / f"load-{now.strftime('%Y%m%d-%H%M%S')}"


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="grpc://127.0.0.1:50051",
                        help="grpc://HOST:PORT (Ask) or http://HOST:PORT (/v1/chat/completions); "
                             "default grpc://127.0.0.1:50051")
    parser.add_argument("--concurrency", type=int, nargs="+", metavar="C",
                        help="closed-loop points: C workers each (default 1 2 4 8 when no --rate)")
    parser.add_argument("--rate", type=float, nargs="+", metavar="R",
                        help="open-loop points: Poisson arrivals at R requests/s (seeded)")
    parser.add_argument("--duration", type=float, metavar="S",
                        help=f"timed seconds per point (default {DEFAULT_DURATION_S:g}; with --requests: a cap, "
                             f"default {MAX_POINT_S:g})")
    parser.add_argument("--requests", type=int, metavar="N", help="timed requests per point")
    parser.add_argument("--warmup", type=float, default=2.0, metavar="S",
                        help="seconds of unrecorded load before each point (default 2)")
    parser.add_argument("--mix", default=DEFAULT_MIX, help=f"fusion-mode mix MODE=WEIGHT,... (default {DEFAULT_MIX})")
    parser.add_argument("--repeat-ratio", type=float, default=0.3,
                        help="share of requests that resend an image already sent (feature cache); default 0.3")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--options", default=OPTIONS, help="MMVP-style options ('' for a free-form answer)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request (default 60)")
    parser.add_argument("--max-in-flight", type=int, default=MAX_IN_FLIGHT,
                        help="open loop: outstanding requests beyond this count as client_overload errors")
    parser.add_argument("--seed", type=int, default=0, help="seeds arrivals, modes and image choice")
    parser.add_argument("--out", type=Path, help="results folder (default results/load-<timestamp>/)")
    parser.add_argument("--no-plots", action="store_true", help="write JSON and Markdown only")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--triton-metrics", metavar="URL",
                        help="Triton's Prometheus page (http://127.0.0.1:PORT/metrics, as `mofserve serve` logs it): "
                             "adds each model's queue and compute time and the feature-cache hits per point "
                             "(found by itself with --serve)")
    parser.add_argument("--serve", metavar="PROFILE", choices=("tiny", "small", "paper"),
                        help="start `mofserve serve --profile PROFILE` on free loopback ports for the run and stop "
                             "it afterwards (its log: OUT/serve.log); --target's scheme picks gRPC or HTTP")
    parser.add_argument("--baseline", nargs="+", choices=BASELINES, default=[], metavar="NAME",
                        help="before the sweep, in this process, answer the same images and questions with no "
                             "server: eager (transformers + PyTorch fp32, one at a time) and/or exported (the "
                             "served graphs in-process); reports the throughput and p50 ratios against the targets")
    parser.add_argument("--baseline-requests", type=int, default=DEFAULT_BASELINE_REQUESTS, metavar="N",
                        help=f"timed requests per baseline (default {DEFAULT_BASELINE_REQUESTS})")
    parser.add_argument("--baseline-profile", choices=("tiny", "small"),
                        help="profile of the baselines (default: the one the server reports)")
    parser.add_argument("--perf-analyzer", nargs="+", metavar="MODEL",
                        help="after the sweep, NVIDIA perf_analyzer on these Triton ensembles (tokens_<mode>, "
                             "vqa_<mode>, embed) at the same concurrencies, beside the front-end's points "
                             "(installs it into $MOFSERVE_HOME/tools on first use; needs --serve or --triton-url)")
    parser.add_argument("--triton-url", metavar="HOST:PORT",
                        help="Triton's gRPC address for --perf-analyzer without --serve")
    from .perf_analyzer import add_perf_analyzer_arguments

    add_perf_analyzer_arguments(parser, standalone=False)


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(target=parse_target(args.target), concurrency=list(args.concurrency or []),
                      rates=list(args.rate or []), duration_s=args.duration, requests=args.requests,
                      warmup_s=args.warmup, mix=parse_mix(args.mix), repeat_ratio=args.repeat_ratio,
                      question=args.question, options=args.options, max_new_tokens=args.max_new_tokens,
                      timeout_s=args.timeout, max_in_flight=args.max_in_flight, seed=args.seed,
                      progress=not args.quiet, triton_metrics=args.triton_metrics,
                      baselines=list(getattr(args, "baseline", None) or []),
                      baseline_requests=getattr(args, "baseline_requests", DEFAULT_BASELINE_REQUESTS),
                      baseline_profile=getattr(args, "baseline_profile", None))


def _perf_analyzer_section(args: argparse.Namespace, config: LoadConfig, triton_grpc: str | None) -> dict | None:
    """perf_analyzer on ``args.perf_analyzer``'s models at the sweep's concurrencies (None when not asked)."""
    from .perf_analyzer import ToolUnavailable, config_from_args, run_sweep

    models = getattr(args, "perf_analyzer", None)
    if not models:
        return None
    if not triton_grpc:
        raise RuntimeError("perf-analyzer: give --serve PROFILE or --triton-url HOST:PORT (Triton's gRPC address)")
    pa_config = config_from_args(args, triton_grpc, models, config.concurrency or DEFAULT_CONCURRENCY,
                                 config.triton_metrics)
    out = args.out or default_out_dir()
    try:
        return run_sweep(pa_config, work=out / "perf_analyzer")
    except ToolUnavailable as error:  # the front-end's report is kept; the section says why
        print(f"mofserve bench load: perf_analyzer: {error}", file=sys.stderr)
        return {"error": str(error), "points": []}


def main(args: argparse.Namespace) -> int:
    from .report import format_markdown, write_report

    config = config_from_args(args)
    args.out = out = args.out or default_out_dir()
    try:
        if getattr(args, "serve", None):
            with ServeProcess(args.serve, out / "serve.log") as served:
                config.target = parse_target(served.endpoints[config.target.scheme])
                config.triton_metrics = config.triton_metrics or served.triton_metrics
                report = asyncio.run(run_load(config))
                section = _perf_analyzer_section(args, config, served.triton_grpc)
        else:
            report = asyncio.run(run_load(config))
            section = _perf_analyzer_section(args, config, getattr(args, "triton_url", None))
    except RuntimeError as error:
        print(f"mofserve bench load: {error}", file=sys.stderr)
        return 1
    if section is not None:
        report["perf_analyzer"] = section
    written = write_report(report, out, plots=not args.no_plots)
    print(format_markdown(report))
    print(f"\nwritten: {', '.join(str(p) for p in written)}")
    return 0


def summary_rows(points: Sequence[Mapping]) -> list[dict]:
    """The points without their raw records (what the Markdown and plots read)."""
    return [{k: v for k, v in p.items() if k != "records"} for p in points]
