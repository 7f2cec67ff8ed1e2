"""``mofserve soak``: serve a profile, drive it at a fixed concurrency for a long time and check
that nothing fails and that no process grows.

It starts ``mofserve serve`` on free loopback ports (``benchmarks.serve_process.ServeProcess``), drives its
gRPC Ask with ``bench load``'s closed loop (``LoadRunner``: C workers, a fusion-mode mix, fresh and
repeated images) and samples the resident memory (``VmRSS``) of every process of the service:
the front-end, ``tritonserver`` and each python-backend stub, named by its model. The first
sample is taken after a warm-up (models loaded, first allocations made, feature cache filling),
the last after the load stops. A process "grows" when its RSS rose by more than
``max(rss_tolerance_mib, rss_tolerance_ratio * before)``; see docs/reliability.md ("Load and
soak") for why that tolerance. Errors are counted by code; every one is unexpected here (no fault
is injected). Writes ``soak.json`` and ``soak.md`` and exits 1 on an error, a grown process or a
process that was replaced (Triton restarted under the load).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mofserve.core.profiles import PROFILE_NAMES
from mofserve.core.reports import write_json, write_text

from .load import LoadConfig, parse_target
from .load_runner import LoadRunner
from .serve_process import ServeProcess
from .stats import DEFAULT_MIX, parse_mix, summarise_point
from .transports import make_transport
from .workload import ImagePool

MIB = 1 << 20
STUB = "triton_python_backend_stub"


# --------------------------------------------------------------------------------------------
# Processes and their memory (/proc; Linux only)


def _status(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` (``VmRSS``), or None once it is gone (or a zombie)."""
    try:
        value = _status(pid).get("VmRSS")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(value.split()[0]) * 1024 if value else None


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (scans /proc: the per-task ``children`` file is not always there)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if int(_status(int(entry.name)).get("PPid", "0")) == pid:
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return sorted(found)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except (FileNotFoundError, ProcessLookupError):
        return []


def role(pid: int) -> str:
    """``tritonserver``, ``stub:<model>`` (from the stub's model.py path) or the program's name."""
    args = _cmdline(pid)
    if not args:
        return "gone"
    program = Path(args[0]).name
    if program == STUB and len(args) > 1:
        model_py = Path(args[1])  # <repository>/<model>/<version>/model.py
        return f"stub:{model_py.parent.parent.name}"
    return program


def service_processes(frontend_pid: int) -> dict[str, int]:
    """Every process of a running ``mofserve serve``: {role: pid}, the front-end as ``front-end``.

    Triton is a child of the front-end and the stubs are children of Triton."""
    found = {"front-end": frontend_pid}
    for child in children(frontend_pid):
        name = role(child)
        if name != "tritonserver":
            continue
        found[name] = child
        for stub in children(child):
            found[role(stub)] = stub
    return found


def rss_sample(processes: Mapping[str, int]) -> dict[str, int | None]:
    return {name: rss_bytes(pid) for name, pid in processes.items()}


@dataclass(frozen=True)
class RssTolerance:
    """How much a process may grow between two samples: the larger of ``mib`` and ``ratio`` of its
    size before (small stubs get the absolute floor, large ones the ratio)."""

    mib: float = 64.0
    ratio: float = 0.25

    def allowed_bytes(self, before: int) -> float:
        return max(self.mib * MIB, self.ratio * before)


def rss_growth(before: Mapping[str, int | None], after: Mapping[str, int | None],
               tolerance: RssTolerance, middle: Mapping[str, int | None] | None = None) -> list[dict]:
    """One row per process: before, after, growth (MiB) and whether it is within ``tolerance``;
    with ``middle`` (a sample half-way), the growth over the second half too: caches that fill up
    stop growing, a leak does not."""
    rows = []
    for name in sorted(before):
        b, a = before[name], after.get(name)
        m = (middle or {}).get(name)
        late = _mib(a - m) if a is not None and m is not None else None
        if b is None or a is None:
            rows.append({"process": name, "before_mib": _mib(b), "after_mib": _mib(a), "growth_mib": None,
                         "late_growth_mib": late, "allowed_mib": None, "ok": False, "note": "process gone"})
            continue
        allowed = tolerance.allowed_bytes(b)
        rows.append({"process": name, "before_mib": _mib(b), "after_mib": _mib(a), "growth_mib": _mib(a - b),
                     "late_growth_mib": late, "allowed_mib": _mib(allowed), "ok": a - b <= allowed, "note": ""})
    return rows


def _mib(value: float | None) -> float | None:
    return None if value is None else round(value / MIB, 1)


# --------------------------------------------------------------------------------------------
# The soak


@dataclass
class SoakConfig:
    profile: str = "tiny"
    duration_s: float = 600.0
    concurrency: int = 4
    warmup_s: float = 20.0
    sample_every_s: float = 10.0
    mix: dict[str, float] = field(default_factory=lambda: parse_mix(DEFAULT_MIX))
    repeat_ratio: float = 0.3
    images: int = 1024  # pool size: fresh images go round it once used up (benchmarks.stats.ImagePicker)
    timeout_s: float = 60.0
    tolerance: RssTolerance = field(default_factory=RssTolerance)
    seed: int = 0
    progress: bool = True  # bench load's status line every few seconds
    stream: bool = True  # Ask through AskStream (token streams held open, as apps use it)

    def __post_init__(self) -> None:
        if not self.duration_s > 0:
            raise ValueError(f"duration: must be > 0 s, got {self.duration_s}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency: must be >= 1, got {self.concurrency}")
        if self.warmup_s < 0 or not self.sample_every_s > 0:
            raise ValueError(f"warmup / sample-every: must be >= 0 / > 0 s, got {self.warmup_s} / "
                             f"{self.sample_every_s}")
        if self.images < 1:
            raise ValueError(f"images: must be >= 1, got {self.images}")


async def soak(target: str, frontend_pid: int, config: SoakConfig, log=None) -> dict:
    """Drive the gRPC front-end at ``target`` (``grpc://HOST:PORT``) of the server whose front-end
    process is ``frontend_pid``; returns the report (see ``verdict`` for pass/fail)."""
    log = log or (lambda message: print(f"[soak] {message}", file=sys.stderr, flush=True))
    load = LoadConfig(target=parse_target(target), concurrency=[config.concurrency], duration_s=None,
                      requests=None, warmup_s=config.warmup_s, mix=dict(config.mix), repeat_ratio=config.repeat_ratio,
                      timeout_s=config.timeout_s, seed=config.seed, progress=config.progress,
                      stream=config.stream)
    images = ImagePool()
    images.ensure(config.images)
    transport = make_transport(load.target, load, images)
    await transport.open()
    try:
        server = await transport.info()
        runner = LoadRunner(load, transport, images)
        if config.warmup_s > 0:
            log(f"warm-up: {config.warmup_s:g} s at concurrency {config.concurrency}")
            warm, _ = await runner.closed_phase(config.concurrency, config.warmup_s, None, "warm-up")
        else:
            warm = []
        processes = service_processes(frontend_pid)
        before = rss_sample(processes)
        samples = [{"t_s": 0.0, "rss_mib": {k: _mib(v) for k, v in before.items()}}]
        middle: dict[str, int | None] = {}
        log(f"processes: {len(processes)} ({', '.join(sorted(processes))}); soak {config.duration_s:g} s")
        started = time.monotonic()

        async def sampler() -> None:
            while True:
                await asyncio.sleep(config.sample_every_s)
                now = rss_sample(processes)
                if not middle and time.monotonic() - started >= config.duration_s / 2:
                    middle.update(now)
                samples.append({"t_s": round(time.monotonic() - started, 1),
                                "rss_mib": {k: _mib(v) for k, v in now.items()}})
                total = sum(v for v in now.values() if v is not None)
                log(f"t={time.monotonic() - started:.0f} s: RSS of all processes {total / MIB:.0f} MiB")

        sampling = asyncio.create_task(sampler())
        try:
            records, elapsed = await runner.closed_phase(config.concurrency, config.duration_s, None, "soak")
        finally:
            sampling.cancel()
        after = rss_sample(processes)
        samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mib": {k: _mib(v) for k, v in after.items()}})
        replaced = sorted(name for name, pid in service_processes(frontend_pid).items()
                          if processes.get(name) != pid)
    finally:
        await transport.close()
    point = summarise_point(records, elapsed)
    return {
        "config": {**asdict(config), "target": target},
        "server": server,
        "warmup": {"requests": len(warm), "errors_by_code": summarise_point(warm, 1.0)["errors_by_code"]},
        "load": point,
        "processes": processes,
        "replaced": replaced,
        "rss": rss_growth(before, after, config.tolerance, middle or None),
        "rss_samples": samples,
    }


def verdict(report: Mapping) -> list[str]:
    """What failed (empty: the soak passed): errors, grown or replaced processes."""
    problems = []
    load = report["load"]
    if load["errors"]:
        problems.append(f"{load['errors']} of {load['requests']} requests failed: {load['errors_by_code']}")
    if not load["ok"]:
        problems.append("no request succeeded")
    for row in report["rss"]:
        if not row["ok"]:
            problems.append(f"{row['process']}: RSS {row['before_mib']} -> {row['after_mib']} MiB "
                            f"(allowed +{row['allowed_mib']} MiB) {row['note']}".rstrip())
    if report["replaced"]:
        problems.append(f"processes replaced during the soak: {report['replaced']}")
    return problems


def format_markdown(report: Mapping) -> str:
    c, load = report["config"], report["load"]
    lat = load["latency_ms"]
    lines = [
        f"# Soak: profile {c['profile']}, concurrency {c['concurrency']}, {load['elapsed_s']:.0f} s",
        "",
        f"- requests {load['requests']}, ok {load['ok']}, errors {load['errors']} "
        f"{load['errors_by_code'] or ''}".rstrip(),
        f"- throughput {load['throughput_rps']:.2f} req/s; latency ms p50 {lat.get('p50', float('nan')):.1f} "
        f"p99 {lat.get('p99', float('nan')):.1f} max {lat.get('max', float('nan')):.1f}",
        f"- modes {load['modes']}, repeated images {load['repeated_share']:.2f}",
        f"- RSS tolerance per process: max({c['tolerance']['mib']:g} MiB, {c['tolerance']['ratio']:.0%} of before)",
        "",
        "| process | RSS before (MiB) | after (MiB) | growth (MiB) | second half (MiB) | allowed (MiB) | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rss"]:
        late = "" if row.get("late_growth_mib") is None else row["late_growth_mib"]
        lines.append(f"| {row['process']} | {row['before_mib']} | {row['after_mib']} | {row['growth_mib']} | "
                     f"{late} | {row['allowed_mib']} | {'yes' if row['ok'] else 'NO ' + row['note']} |")
    total_before = sum(r["before_mib"] or 0 for r in report["rss"])
    total_after = sum(r["after_mib"] or 0 for r in report["rss"])
    lines += [f"| total | {total_before:.1f} | {total_after:.1f} | {total_after - total_before:.1f} | | | |", ""]
    problems = verdict(report)
    lines.append("**Verdict: " + ("pass**" if not problems else "FAIL**: " + "; ".join(problems)))
    return "\n".join(lines) + "\n"


def write_report(report: Mapping, out: Path) -> list[Path]:
    paths = [out / "soak.json", out / "soak.md"]
    write_json(paths[0], report, indent=1)
    write_text(paths[1], format_markdown(report))
    return paths


# --------------------------------------------------------------------------------------------
# CLI


def arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mofserve soak``."""
    parser.add_argument("--profile", default="tiny", choices=PROFILE_NAMES)
    parser.add_argument("--duration", type=float, default=600.0, metavar="S", help="timed seconds (default 600)")
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop workers (default 4)")
    parser.add_argument("--warmup", type=float, default=20.0, metavar="S",
                        help="seconds of load before the first RSS sample (default 20)")
    parser.add_argument("--sample-every", type=float, default=10.0, metavar="S", help="RSS sampling period")
    parser.add_argument("--mix", default=DEFAULT_MIX, help=f"fusion-mode mix MODE=WEIGHT,... (default {DEFAULT_MIX})")
    parser.add_argument("--repeat-ratio", type=float, default=0.3)
    parser.add_argument("--images", type=int, default=1024, help="image pool size (default 1024)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    parser.add_argument("--rss-tolerance-mib", type=float, default=RssTolerance.mib)
    parser.add_argument("--rss-tolerance-ratio", type=float, default=RssTolerance.ratio)
    parser.add_argument("--out", type=Path, help="results folder (default results/soak-<timestamp>/)")


def config_from_args(args: argparse.Namespace) -> SoakConfig:
    return SoakConfig(profile=args.profile, duration_s=args.duration, concurrency=args.concurrency,
                      warmup_s=args.warmup, sample_every_s=args.sample_every, mix=parse_mix(args.mix),
                      repeat_ratio=args.repeat_ratio, images=args.images, timeout_s=args.timeout,
                      tolerance=RssTolerance(args.rss_tolerance_mib, args.rss_tolerance_ratio))


def soak_service(config: SoakConfig, out: Path) -> tuple[dict, list[Path]]:
    """Serve ``config.profile``, soak it, stop it; returns the report and the files written."""
    with ServeProcess(config.profile, out / "serve.log") as served:
        report = asyncio.run(soak(served.endpoints["grpc"], served.process.pid, config))
    return report, write_report(report, out)


def run(args: argparse.Namespace) -> int:
    """``mofserve soak``: serve, load and sample; 1 on errors or RSS growth (what CI gates on)."""
    config = config_from_args(args)
    out = args.out or Path("results") / f"soak-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        report, written = soak_service(config, out)
    except RuntimeError as error:
        print(f"mofserve soak: {error}", file=sys.stderr)
        return 1
    print(format_markdown(report))
    print(f"written: {', '.join(str(p) for p in written)}")
    return 1 if verdict(report) else 0

