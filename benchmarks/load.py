"""``mofserve bench load``: a load generator for a running mofserve front-end (gRPC or HTTP).

Against ``grpc://HOST:PORT`` (``AsyncMofServeClient.ask_stream``, or ``ask`` with ``--no-stream``)
or ``http://HOST:PORT`` (aiohttp, the OpenAI-compatible ``POST /v1/chat/completions``;
``benchmarks/transports.py``) it runs, one point after another:

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
variants (crops, flips, colour jitter; ``benchmarks.workload.make_variant``) of the real
scikit-image photos of ``mofserve.core.samples``: with probability ``--repeat-ratio`` an image
already sent (its encoder features are then in the server's feature cache), else a new one. The
pool is shared by all points, so an image is fresh only once per run.

Per point: throughput (successes / (time until the last answer)), latency p50/p90/p95/p99/max of
the successes, errors by code, the mean of the server's per-stage timings that the answers carry
(overall, per mode, fresh vs repeated image; the LLM split into queue / prefill / decode), output
tokens/s and, for streamed answers, time to first token and inter-token latency p50/p99 and the
LLM's decode tokens/s (``stats.token_summary``), and the raw records. The closed and open loops:
``benchmarks/load_runner.py``. Same-run in-process baselines and the targets' MET / MISSED:
``benchmarks/baselines.py``; the paper-shaped LM's 32-layer extrapolation:
``benchmarks/llm_stage.py``. See ``benchmarks/report.py`` for the files written (JSON, Markdown,
PNG plots).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from mofserve.core.profiles import PROFILE_NAMES

from . import perf_analyzer
from .baselines import BASELINES, DEFAULT_BASELINE_REQUESTS, run_baselines
from .llm_stage import measure_for_load
from .load_runner import LoadRunner
from .perf_analyzer_tool import ToolUnavailable
from .report import build_report, format_markdown, write_report
from .serve_process import ServeProcess
from .stats import DEFAULT_MIX, parse_mix
from .transports import make_transport
from .workload import MAX_NEW_TOKENS, OPTIONS, QUESTION, ImagePool

DEFAULT_CONCURRENCY = (1, 2, 4, 8)
DEFAULT_DURATION_S = 10.0
MAX_POINT_S = 600.0  # a point started with --requests only stops after this long anyway
DEFAULT_TIMEOUT_S = 60.0
MAX_IN_FLIGHT = 256
FIRST_POOL = 32  # images made before the first point; later points top up from the rate seen


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
    stream: bool = False  # gRPC: AskStream (time to first token, inter-token latency); the CLI's default
    extrapolate_layers: int | None = None  # measure the LM's per-layer cost in process, extrapolate to N

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
        if self.stream and self.target.scheme != "grpc":
            self.stream = False  # HTTP is measured unary (whole answers)
        if self.extrapolate_layers is not None and not 1 <= self.extrapolate_layers <= 1000:
            raise ValueError(f"extrapolate-layers: must be within [1, 1000], got {self.extrapolate_layers}")

    @property
    def time_cap_s(self) -> float:
        return self.duration_s if self.duration_s is not None else MAX_POINT_S

    def to_dict(self) -> dict:
        out = asdict(self)
        out["target"] = self.target.url
        return out


# --------------------------------------------------------------------------------------------
# Entry points


def run_in_process(config: LoadConfig, images: ImagePool, profile: str) -> dict:
    """The in-process parts of a run, before its sweep: the baselines (``--baseline``) and the LM's
    per-layer costs (``--extrapolate-layers``); blocking and CPU-bound."""
    out: dict = {"baselines": run_baselines(config, images, profile) if config.baselines else {}, "layers": None}
    if config.extrapolate_layers:
        out["layers"] = measure_for_load(profile, config)
    return out


async def run_load(config: LoadConfig, images: ImagePool | None = None, in_process: dict | None = None) -> dict:
    """Run every point of ``config`` against its target and return the report (not yet written).
    ``in_process``: what ``run_in_process`` measured already (``main`` runs it before it starts a
    server for ``--serve``, so that the two never hold memory and cores at once); otherwise it runs
    here, the server idling meanwhile."""
    images = images or ImagePool()
    images.ensure(max(FIRST_POOL, config.baseline_requests + 1 if config.baselines else 0))
    transport = make_transport(config.target, config, images)
    await transport.open()
    try:
        server = await transport.info()
        began = time.time()
        if in_process is None and (config.baselines or config.extrapolate_layers):
            profile = config.baseline_profile or server.get("profile")
            if not profile:
                raise RuntimeError("baseline: the server did not say its profile; give --baseline-profile")
            # CPU-bound and blocking: off the loop, which may also serve the front-end (tests)
            in_process = await asyncio.to_thread(run_in_process, config, images, profile)
        runner = LoadRunner(config, transport, images)
        points = await runner.run()
    finally:
        await transport.close()
    in_process = in_process or {}
    return build_report(config, server, points, began=began, images=len(images),
                        baselines=in_process.get("baselines") or None, layers=in_process.get("layers"))


def default_out_dir(now: _dt.datetime | None = None) -> Path:
    now = now or _dt.datetime.now()
    return Path("results") / f"load-{now.strftime('%Y%m%d-%H%M%S')}"


def arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mofserve bench load`` (with ``--perf-analyzer``'s, shared with that command)."""
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

    parser.add_argument("--serve", metavar="PROFILE", choices=PROFILE_NAMES,
                        help="start `mofserve serve --profile PROFILE` on free loopback ports for the run and stop "
                             "it afterwards (its log: OUT/serve.log); --target's scheme picks gRPC or HTTP")
    parser.add_argument("--baseline", nargs="+", choices=BASELINES, default=[], metavar="NAME",
                        help="before the sweep, in this process, answer the same images and questions with no "
                             "server, one at a time: eager (transformers + PyTorch fp32), eager-bf16 (autocast "
                             "bf16 towers, bf16 LM) and/or exported (the served graphs and the LM's engine "
                             "in-process); reports the throughput, p50 and TTFT ratios against the targets")
    parser.add_argument("--baseline-requests", type=int, default=DEFAULT_BASELINE_REQUESTS, metavar="N",
                        help=f"timed requests per baseline (default {DEFAULT_BASELINE_REQUESTS})")
    parser.add_argument("--baseline-profile", choices=[p for p in PROFILE_NAMES if p != "paper"],
                        help="profile of the baselines (default: the one the server reports)")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="gRPC: ask with AskStream (time to first token, inter-token latency, decode tokens/s; "
                             "default) or, with --no-stream, with Ask (whole answers)")
    parser.add_argument("--extrapolate-layers", type=int, metavar="N",
                        help="before the sweep, measure the LM's per-layer cost in process (prefill and decode "
                             "steps with 1, 2 and 4 of its layers) and extrapolate the measured prefill and decode "
                             "times to an N-layer LM (32: LLaMA-7B), labelled as an extrapolation in the report")
    parser.add_argument("--perf-analyzer", nargs="+", metavar="MODEL",
                        help="after the sweep, NVIDIA perf_analyzer on these Triton ensembles (tokens_<mode>, "
                             "vqa_<mode>, embed) at the same concurrencies, beside the front-end's points "
                             "(installs it into $MOFSERVE_HOME/tools on first use; needs --serve or --triton-url)")
    parser.add_argument("--triton-url", metavar="HOST:PORT",
                        help="Triton's gRPC address for --perf-analyzer without --serve")
    perf_analyzer.arguments(parser, standalone=False)


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(target=parse_target(args.target), concurrency=list(args.concurrency or []),
                      rates=list(args.rate or []), duration_s=args.duration, requests=args.requests,
                      warmup_s=args.warmup, mix=parse_mix(args.mix), repeat_ratio=args.repeat_ratio,
                      question=args.question, options=args.options, max_new_tokens=args.max_new_tokens,
                      timeout_s=args.timeout, max_in_flight=args.max_in_flight, seed=args.seed,
                      progress=not args.quiet, triton_metrics=args.triton_metrics,
                      baselines=list(getattr(args, "baseline", None) or []),
                      baseline_requests=getattr(args, "baseline_requests", DEFAULT_BASELINE_REQUESTS),
                      baseline_profile=getattr(args, "baseline_profile", None),
                      stream=getattr(args, "stream", True),
                      extrapolate_layers=getattr(args, "extrapolate_layers", None))


def _perf_analyzer_section(args: argparse.Namespace, config: LoadConfig, triton_grpc: str | None) -> dict | None:
    """perf_analyzer on ``args.perf_analyzer``'s models at the sweep's concurrencies (None when not asked)."""
    models = getattr(args, "perf_analyzer", None)
    if not models:
        return None
    if not triton_grpc:
        raise RuntimeError("perf-analyzer: give --serve PROFILE or --triton-url HOST:PORT (Triton's gRPC address)")
    pa_config = perf_analyzer.config_from_args(args, triton_grpc, models, config.concurrency or DEFAULT_CONCURRENCY,
                                 config.triton_metrics)
    out = args.out or default_out_dir()
    try:
        return perf_analyzer.run_sweep(pa_config, work=out / "perf_analyzer")
    except ToolUnavailable as error:  # the front-end's report is kept; the section says why
        print(f"mofserve bench load: perf_analyzer: {error}", file=sys.stderr)
        return {"error": str(error), "points": []}


def run(args: argparse.Namespace) -> int:
    """``mofserve bench load``: the sweeps the flags describe, then the JSON + Markdown + PNG report."""
    config = config_from_args(args)
    args.out = out = args.out or default_out_dir()
    try:
        if getattr(args, "serve", None):
            images, in_process = ImagePool(), None
            if config.baselines or config.extrapolate_layers:  # before the server holds memory and cores
                images.ensure(max(FIRST_POOL, config.baseline_requests + 1))
                in_process = run_in_process(config, images, config.baseline_profile or args.serve)
            with ServeProcess(args.serve, out / "serve.log") as served:
                config.target = parse_target(served.endpoints[config.target.scheme])
                config.triton_metrics = config.triton_metrics or served.triton_metrics
                report = asyncio.run(run_load(config, images, in_process))
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
