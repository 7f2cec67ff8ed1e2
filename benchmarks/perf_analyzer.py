"""``mofserve bench perf-analyzer``: NVIDIA's perf_analyzer on the Triton ensembles, with real images.

Why a module of its own: perf_analyzer measures Triton with no mofserve code in the path (its own
C++ gRPC client), so its figures are the floor the front-end's own load generator
(``benchmarks/load.py``) is compared with. Getting it to run on a CPU-only Debian 12 machine takes
three pieces that no single package installs (the tritonclient 2.51.0 wheel's binary, libcudart,
libb64): ``benchmarks/perf_analyzer_tool.py`` fetches them, caches them by version under
``$MOFSERVE_HOME/tools/`` (``install_perf_analyzer``) and puts them on ``LD_LIBRARY_PATH`` only
for the perf_analyzer process.

Input data (:func:`input_data`) is a perf_analyzer ``--input-data`` JSON built from deterministic
JPEG variants of the scikit-image photos (``benchmarks.workload.ImagePool``): ``IMAGE`` as a BYTES
element (perf_analyzer reads a ``b64`` BYTES value as Triton's serialised string tensor, so each
image is prefixed with its little-endian uint32 length), and for ``vqa_<mode>`` the question,
options and ``MAX_NEW_TOKENS`` of the load benchmark. Every point gets its own images, never sent before;
perf_analyzer cycles through them, so once a point has sent them all the encoders answer from their
feature cache: the report carries the cache's hits and misses per point (Triton's metrics before
and after, ``stats.triton_delta``).

One perf_analyzer run per model and concurrency (``--concurrency-range C:C``; count windows for
slow models), its CSV (``-f``, ``--verbose-csv``) parsed by :func:`parse_csv` into points of the
same shape as the load sweep's (``kind``/``value``/``throughput_rps``/``latency_ms``), which
``benchmarks/report.py`` writes (JSON, Markdown, PNG) beside the front-end's points.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as _dt
import io
import json
import logging
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from mofserve.core import tensors as T
from mofserve.core.machine import git_commit, load_average, machine_info, versions
from mofserve.core.profiles import PROFILE_NAMES

from .perf_analyzer_tool import PerfAnalyzerTool, ToolUnavailable, install_perf_analyzer
from .report import format_markdown, write_report
from .serve_process import ServeProcess
from .stats import parse_prometheus, triton_delta
from .workload import MAX_NEW_TOKENS, OPTIONS, QUESTION, ImagePool

_logger = logging.getLogger(__name__)

DEFAULT_MODELS = ("vqa_interleaved",)
DEFAULT_CONCURRENCY = (1, 2, 4)
DEFAULT_IMAGES = 64  # per point: a slow model's whole point stays cold; a fast one cycles through them
IMAGE_SEED = 20261127  # not the load sweep's variants: in a `bench load --perf-analyzer` run they start cold
DEFAULT_REQUEST_COUNT = 20  # requests per measurement window (count_windows)
DEFAULT_STABILITY = 25  # percent; a CPU shared with other work rarely settles within 10
DEFAULT_MAX_TRIALS = 6
DEFAULT_RUN_TIMEOUT_S = 600.0

# perf_analyzer's CSV columns (microseconds unless said) -> our names (milliseconds)
LATENCY_COLUMNS = {"p50 latency": "p50", "p90 latency": "p90", "p95 latency": "p95", "p99 latency": "p99",
                   "Avg latency": "mean"}
STAGE_COLUMNS = {"Client Send": "client_send", "Network+Server Send/Recv": "network_server_send_recv",
                 "Server Queue": "server_queue", "Server Compute Input": "server_compute_input",
                 "Server Compute Infer": "server_compute_infer", "Server Compute Output": "server_compute_output",
                 "Client Recv": "client_recv", "request/response": "grpc_marshal", "response wait": "response_wait"}


# --------------------------------------------------------------------------------------------
# Input data


def bytes_element(data: bytes) -> dict[str, str]:
    """One BYTES tensor element as perf_analyzer's ``{"b64": ...}``: it decodes the base64 into
    Triton's serialised string tensor, i.e. a little-endian uint32 length, then the bytes."""
    return {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode("ascii")}


def model_inputs(model: str) -> tuple[str, ...]:
    """Which inputs perf_analyzer must send to ``model`` (optional ones, such as ALPHA, are left out:
    the profile's default applies). Raises ValueError naming ``models`` for any other model."""
    kind, _, mode = model.partition("_")
    if model == T.EMBED:
        return (T.IMAGE,)
    if kind in ("tokens", "vqa") and mode:
        T.FusionMode.parse(mode)  # names the mode when it is unknown
        return (T.IMAGE,) if kind == "tokens" else (T.IMAGE, T.QUESTION, T.OPTIONS, T.MAX_NEW_TOKENS)
    raise ValueError(f"models: {model!r} is not an image ensemble; expected tokens_<mode>, vqa_<mode> or embed")


def input_data(model: str, images: Sequence[bytes], question: str, options: str, max_new_tokens: int) -> dict:
    """perf_analyzer's ``--input-data`` JSON for ``model``: one entry per image, in order."""
    if not images:
        raise ValueError("images: need at least one image")
    names = model_inputs(model)
    entries = []
    for image in images:
        entry: dict = {T.IMAGE: bytes_element(image)}
        if T.QUESTION in names:
            entry[T.QUESTION] = [question]
            if options:
                entry[T.OPTIONS] = [options]
            entry[T.MAX_NEW_TOKENS] = [int(max_new_tokens)]
        entries.append(entry)
    return {"data": entries}


# --------------------------------------------------------------------------------------------
# The CSV


def parse_csv(text: str) -> list[dict]:
    """perf_analyzer's ``-f`` CSV (plain or ``--verbose-csv``, with or without ``--collect-metrics``)
    -> one dict per concurrency (or request-rate) row: ``kind``, ``value``, ``throughput_rps``,
    ``latency_ms`` (p50/p90/p95/p99/mean), ``stages_ms`` (client send/recv, network, server queue
    and compute, as perf_analyzer splits the average latency) and ``gpu`` (its GPU metric columns,
    only the non-empty ones: there are none on a CPU). Raises ValueError on a CSV without them."""
    lines = [line for line in text.splitlines()]
    # the table ends at the first blank line (perf_analyzer may append other sections after it)
    if "" in lines:
        lines = lines[:lines.index("")]
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    if not rows:
        raise ValueError("perf_analyzer CSV: no rows")
    header = rows[0].keys()
    kind = "concurrency" if "Concurrency" in header else "rate" if "Request Rate" in header else None
    if kind is None or "Inferences/Second" not in header or "p50 latency" not in header:
        raise ValueError(f"perf_analyzer CSV: expected Concurrency (or Request Rate), Inferences/Second and "
                         f"p50 latency columns, got {list(header)}")

    def number(value: str | None) -> float | None:
        if value is None or not value.strip():
            return None
        return float(value)

    out = []
    for row in rows:
        value = number(row["Concurrency" if kind == "concurrency" else "Request Rate"])
        latency = {ours: number(row.get(theirs)) for theirs, ours in LATENCY_COLUMNS.items() if theirs in row}
        stages = {ours: number(row.get(theirs)) for theirs, ours in STAGE_COLUMNS.items() if theirs in row}
        gpu = {k: row[k] for k in row if k and k.startswith(("Avg GPU", "Max GPU", "Total GPU")) and row[k]}
        out.append({
            "kind": kind, "value": value, "throughput_rps": number(row["Inferences/Second"]),
            "latency_ms": {k: (v / 1000.0 if v is not None else None) for k, v in latency.items()},
            "stages_ms": {k: (v / 1000.0 if v is not None else None) for k, v in stages.items()},
            "gpu": gpu,
        })
    return out


# --------------------------------------------------------------------------------------------
# Running it


@dataclass
class PerfAnalyzerConfig:
    triton_grpc: str  # HOST:PORT of Triton's gRPC endpoint
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    concurrency: list[int] = field(default_factory=lambda: list(DEFAULT_CONCURRENCY))
    images: int = DEFAULT_IMAGES
    request_count: int = DEFAULT_REQUEST_COUNT
    stability_percent: int = DEFAULT_STABILITY
    max_trials: int = DEFAULT_MAX_TRIALS
    run_timeout_s: float = DEFAULT_RUN_TIMEOUT_S
    metrics_url: str | None = None  # Triton's Prometheus page: feature-cache hits per point
    question: str | None = None  # None: the load benchmark's question, options and max_new_tokens
    options: str | None = None
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        self.question = QUESTION if self.question is None else self.question
        self.options = OPTIONS if self.options is None else self.options
        self.max_new_tokens = MAX_NEW_TOKENS if self.max_new_tokens is None else self.max_new_tokens
        if "://" in self.triton_grpc:
            scheme, _, rest = self.triton_grpc.partition("://")
            if scheme != "grpc":
                raise ValueError(f"triton-url: give grpc://HOST:PORT or HOST:PORT, got {self.triton_grpc!r}")
            self.triton_grpc = rest
        if ":" not in self.triton_grpc:
            raise ValueError(f"triton-url: give HOST:PORT, got {self.triton_grpc!r}")
        for model in self.models:
            model_inputs(model)
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency: give values >= 1, got {self.concurrency}")
        if not 1 <= self.images <= 1000:
            raise ValueError(f"images: must be within [1, 1000], got {self.images}")
        if self.request_count < 1:
            raise ValueError(f"requests: must be >= 1, got {self.request_count}")
        if not 1 <= self.stability_percent <= 100:
            raise ValueError(f"stability: must be within [1, 100] percent, got {self.stability_percent}")
        if self.max_trials < 1:
            raise ValueError(f"max-trials: must be >= 1, got {self.max_trials}")


def command_line(tool: PerfAnalyzerTool, config: PerfAnalyzerConfig, model: str, concurrency: int,
                 data_path: Path, csv_path: Path) -> list[str]:
    command = [str(tool.binary), "-m", model, "-i", "grpc", "-u", config.triton_grpc, "--input-data", str(data_path),
               "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-mode", "count_windows",
               "--measurement-request-count", str(config.request_count), "--stability-percentage",
               str(config.stability_percent), "--max-trials", str(config.max_trials), "-f", str(csv_path),
               "--verbose-csv"]
    if config.metrics_url:
        command += ["--collect-metrics", "--metrics-url", config.metrics_url]
    if model.startswith("vqa_"):
        # the vqa ensembles end in the decoupled (streaming) llm: unary ModelInfer is refused, and a
        # request counts as done at its last response
        command += ["--streaming"]
    return command


def _scrape(url: str | None) -> dict | None:
    if not url:
        return None
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return parse_prometheus(response.read().decode())
    except OSError:
        return None


UNSTABLE = "Failed to obtain stable measurement"


def _run_once(tool: PerfAnalyzerTool, config: PerfAnalyzerConfig, model: str, concurrency: int, data_path: Path,
              work: Path, stability: int) -> tuple[str | None, str]:
    """One perf_analyzer process -> (error or None, its output); its command and output go to a log."""
    csv_path = work / f"{model}-c{concurrency}.csv"
    csv_path.unlink(missing_ok=True)
    command = command_line(tool, replace(config, stability_percent=stability), model, concurrency, data_path,
                           csv_path)
    error = None
    try:
        done = subprocess.run(command, env=tool.environment(), capture_output=True, text=True,
                              timeout=config.run_timeout_s)
        output = done.stdout + done.stderr
        if done.returncode != 0 or not csv_path.exists():
            error = f"exit code {done.returncode}: " + " | ".join(
                line.strip() for line in output.splitlines()[-6:] if line.strip() and "WARNING" not in line)
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes) else (
            expired.stdout or "")
        error = f"timed out after {config.run_timeout_s:g} s"
    with (work / f"{model}-c{concurrency}.log").open("a") as log_file:
        log_file.write(" ".join(command) + "\n\n" + output + "\n")
    return error, output


def run_point(tool: PerfAnalyzerTool, config: PerfAnalyzerConfig, model: str, concurrency: int, data_path: Path,
              work: Path) -> dict:
    """One model at one concurrency; a failed run gives a point with ``error`` (and no figures)
    instead of raising. When perf_analyzer finds no ``stability_percent`` window-to-window agreement
    (a CPU shared with other work), it is run once more accepting any windows (100%), and the point
    says so in ``unstable``: figures, but read them as noisy."""
    csv_path = work / f"{model}-c{concurrency}.csv"
    before = _scrape(config.metrics_url)
    started = time.time()
    t0 = time.perf_counter()
    point: dict = {"tool": "perf_analyzer", "model": model, "kind": "concurrency", "value": concurrency,
                   "started": _dt.datetime.fromtimestamp(started, _dt.UTC).isoformat(timespec="seconds"),
                   "error": None, "unstable": None}
    error, _ = _run_once(tool, config, model, concurrency, data_path, work, config.stability_percent)
    if error and UNSTABLE in error and config.stability_percent < 100:
        point["unstable"] = (f"no stable windows at {config.stability_percent}%: rerun at 100% with "
                             f"{2 * config.max_trials} trials")
        error, _ = _run_once(tool, replace(config, max_trials=2 * config.max_trials), model, concurrency, data_path,
                             work, 100)
    point["error"] = error
    point["wall_s"] = time.perf_counter() - t0
    if error is None:
        csv_text = csv_path.read_text()
        point["csv"] = csv_text
        (row,) = [r for r in parse_csv(csv_text) if r["value"] == concurrency] or [None]
        if row is None:
            point["error"] = f"the CSV has no row for concurrency {concurrency}"
        else:
            point.update({k: v for k, v in row.items() if k not in ("kind", "value")})
    after = _scrape(config.metrics_url)
    if before is not None and after is not None:
        point["triton"] = triton_delta(before, after)
    return point


def run_sweep(config: PerfAnalyzerConfig, tool: PerfAnalyzerTool | None = None, work: Path | None = None,
              images: Sequence[bytes] | None = None, progress: Callable[[str], None] = _logger.info) -> dict:
    """Every model at every concurrency; returns the report's ``perf_analyzer`` section.

    Each point gets its own ``config.images`` images never sent before (a slice of one seeded
    pool), so a point starts cold and only its own later passes hit the encoders' feature cache;
    ``images`` instead gives every point the same ones."""
    tool = tool or install_perf_analyzer()
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="mofserve-perf-analyzer-")) if own_work else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    pool = ImagePool(seed=IMAGE_SEED)
    n = config.images
    points = []
    sizes: list[int] = []
    try:
        for model in config.models:
            for concurrency in config.concurrency:
                if images is None:
                    first = len(points) * n
                    pool.ensure(first + n)
                    batch = [pool[i] for i in range(first, first + n)]
                else:
                    batch = list(images)[:n]
                sizes += [len(b) for b in batch]
                data_path = work / f"{model}-c{concurrency}.input.json"
                data_path.write_text(json.dumps(input_data(model, batch, config.question, config.options,
                                                           config.max_new_tokens)))
                progress(f"{model} c={concurrency}: running")
                point = run_point(tool, config, model, concurrency, data_path, work)
                point["images"] = len(batch)
                data_path.unlink()  # megabytes of base64; the images are reproducible from the seed
                points.append(point)
                if point["error"]:
                    progress(f"{model} c={concurrency}: FAILED {point['error']}")
                else:
                    note = f" UNSTABLE: {point['unstable']}" if point["unstable"] else ""
                    progress(f"{model} c={concurrency}: {point['throughput_rps']:.2f} infer/s, p50 "
                             f"{point['latency_ms']['p50']:.1f} ms, p99 {point['latency_ms']['p99']:.1f} ms "
                             f"({point['wall_s']:.0f} s){note}")
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    settings = {k: v for k, v in vars(config).items()}
    return {"tool": dict(tool.manifest), "binary": str(tool.binary), "config": settings,
            "images": {"per_point": n, "fresh_per_point": images is None, "seed": IMAGE_SEED,
                       "kind": "JPEG q90 variants of the scikit-image photos (ImagePool)",
                       "mean_bytes": sum(sizes) / len(sizes) if sizes else None},
            "points": points}


# --------------------------------------------------------------------------------------------
# Command line


def arguments(parser: argparse.ArgumentParser, standalone: bool = True) -> None:
    """The perf_analyzer options; ``standalone`` adds the target, output and serving options (`bench
    load --perf-analyzer` shares those of the load benchmark)."""
    if standalone:
        where = parser.add_mutually_exclusive_group()
        where.add_argument("--serve", metavar="PROFILE", choices=PROFILE_NAMES,
                           help="start `mofserve serve --profile PROFILE` on free loopback ports for the run and "
                                "stop it afterwards (its log: OUT/serve.log); default tiny when no --triton-url")
        where.add_argument("--triton-url", metavar="HOST:PORT",
                           help="a running Triton's gRPC address (mofserve serve logs it as `Triton gRPC ...`)")
        parser.add_argument("--triton-metrics", metavar="URL",
                            help="Triton's Prometheus page (found by itself with --serve): feature-cache hits per "
                                 "point")
        parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL",
                            help="tokens_<mode>, vqa_<mode> or embed (default vqa_interleaved)")
        parser.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY), metavar="C",
                            help="one perf_analyzer run per value (default 1 2 4)")
        parser.add_argument("--out", type=Path, help="results folder (default results/perf-analyzer-<timestamp>/)")
        parser.add_argument("--no-plots", action="store_true", help="write JSON and Markdown only")
    parser.add_argument("--pa-images", type=int, default=DEFAULT_IMAGES, metavar="N",
                        help=f"distinct images per point, never sent before (default {DEFAULT_IMAGES}); "
                             "perf_analyzer cycles through them, so later passes hit the encoders' feature cache")
    parser.add_argument("--pa-requests", type=int, default=DEFAULT_REQUEST_COUNT, metavar="N",
                        help=f"requests per measurement window (count_windows; default {DEFAULT_REQUEST_COUNT})")
    parser.add_argument("--pa-stability", type=int, default=DEFAULT_STABILITY, metavar="PERCENT",
                        help=f"perf_analyzer's --stability-percentage (default {DEFAULT_STABILITY})")
    parser.add_argument("--pa-max-trials", type=int, default=DEFAULT_MAX_TRIALS, metavar="N",
                        help=f"perf_analyzer's --max-trials (default {DEFAULT_MAX_TRIALS})")
    parser.add_argument("--pa-timeout", type=float, default=DEFAULT_RUN_TIMEOUT_S, metavar="S",
                        help=f"seconds per perf_analyzer run before it is stopped (default {DEFAULT_RUN_TIMEOUT_S:g})")


def config_from_args(args: argparse.Namespace, triton_grpc: str, models: Sequence[str],
                     concurrency: Sequence[int], metrics_url: str | None) -> PerfAnalyzerConfig:
    return PerfAnalyzerConfig(
        triton_grpc=triton_grpc, models=list(models), concurrency=list(concurrency), images=args.pa_images,
        request_count=args.pa_requests, stability_percent=args.pa_stability, max_trials=args.pa_max_trials,
        run_timeout_s=args.pa_timeout, metrics_url=metrics_url, question=getattr(args, "question", QUESTION),
        options=getattr(args, "options", OPTIONS), max_new_tokens=getattr(args, "max_new_tokens", MAX_NEW_TOKENS))


def build_report(section: Mapping, triton_grpc: str, profile: str | None) -> dict:
    """A report with no front-end points, only the perf_analyzer section (``report.write_report``)."""
    return {"benchmark": "perf_analyzer",
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "target": f"grpc://{triton_grpc}", "transport": "triton-grpc", "server": {"profile": profile},
            "machine": machine_info(), "load_average_end": load_average(),
            "versions": versions(("mofserve", "tritonclient", "nvidia-pytriton")),
            "git_commit": git_commit(), "points": [], "perf_analyzer": dict(section)}


def default_out_dir(now: _dt.datetime | None = None) -> Path:
    now = now or _dt.datetime.now()
    return Path("results") / f"perf-analyzer-{now.strftime('%Y%m%d-%H%M%S')}"


def run(args: argparse.Namespace) -> int:
    """``mofserve bench perf-analyzer``: install it if needed, run it per ensemble, write the report."""
    out = args.out or default_out_dir()
    try:
        tool = install_perf_analyzer()
        _logger.info(tool.version())
        if args.triton_url:
            config = config_from_args(args, args.triton_url, args.models, args.concurrency, args.triton_metrics)
            section = run_sweep(config, tool, work=out / "perf_analyzer")
            report = build_report(section, config.triton_grpc, None)
        else:
            profile = args.serve or "tiny"
            with ServeProcess(profile, out / "serve.log") as served:
                if not served.triton_grpc:
                    raise RuntimeError(f"mofserve serve did not log Triton's gRPC address; see {out / 'serve.log'}")
                config = config_from_args(args, served.triton_grpc, args.models, args.concurrency,
                                          args.triton_metrics or served.triton_metrics)
                section = run_sweep(config, tool, work=out / "perf_analyzer")
            report = build_report(section, config.triton_grpc, profile)
    except (ToolUnavailable, RuntimeError) as error:
        print(f"mofserve bench perf-analyzer: {error}", file=sys.stderr)
        return 1
    written = write_report(report, out, plots=not args.no_plots)
    print(format_markdown(report))
    print(f"\nwritten: {', '.join(str(p) for p in written)}")
    return 0 if any(p["error"] is None for p in section["points"]) else 1
