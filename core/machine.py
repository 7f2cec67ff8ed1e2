"""Machine facts every report records: the CPU (model, matmul ISA flags, usable cores), the
checkout's commit, package versions, the load average and how many cores this process tree and
everyone else used between two instants.

One home for the benchmarks and the evaluators (whose floor is core). The "others" figure exists
because the machines these reports come from are shared: a ratio measured while another suite
used a core says so in its report, which the load average alone cannot separate from our own work.
"""

from __future__ import annotations

import math
import os
import platform
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

TICKS_PER_S = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
PACKAGES = ("mofserve", "torch", "transformers", "onnxruntime", "openvino", "tritonclient", "nvidia-pytriton",
            "grpcio", "protobuf", "numpy", "pillow", "aiohttp", "matplotlib")


def _cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def cpu_model(cpuinfo: str | None = None) -> str:
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in (cpuinfo or "").splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The matmul-relevant ISA flags this CPU advertises (what decides bf16 speed: AMX, AVX-512 BF16)."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in (cpuinfo or "").splitlines():
        if line.lower().startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in MATMUL_FLAGS if f in flags]
    return []


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def git_commit(root: Path | None = None) -> str | None:
    """The checkout's commit, read from ``.git`` files (no git process); None if not a checkout."""
    root = root or Path(__file__).resolve().parents[1]
    git = root / ".git"
    try:
        if git.is_file():  # worktree / submodule: "gitdir: <path>"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        for base in (git, _common_dir(git)):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except OSError:
        return None
    return None


def _common_dir(git: Path) -> Path:
    common = git / "commondir"
    return (git / common.read_text().strip()).resolve() if common.is_file() else git


def versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (None: not installed), read from package metadata without importing."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict[str, Any]:
    """The facts a report names its machine by."""
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "logical_cpus": os.cpu_count(),
            "usable_cpus": usable_cpus(), "python": platform.python_version(),
            "mofserve": versions(("mofserve",))["mofserve"]}


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return [math.nan] * 3


@dataclass(frozen=True)
class CpuSnapshot:
    """Cumulative CPU time in clock ticks: the whole machine (``/proc/stat``) and this process tree
    (a benchmark, the Triton it started and its python-backend stubs)."""

    busy: int  # user + nice + system + irq + softirq of every CPU
    steal: int  # taken by the hypervisor from this guest
    total: int  # busy + steal + idle + iowait
    ours: int  # utime + stime of this process and all its live descendants
    at: float  # time.monotonic()


def cpu_usage(before: CpuSnapshot, after: CpuSnapshot, ticks_per_s: float = TICKS_PER_S) -> dict[str, float]:
    """Average cores used between two snapshots: by the whole machine, by this process tree and by
    every other process (machine - ours; what the load average cannot separate), plus steal."""
    seconds = after.at - before.at
    if seconds <= 0 or ticks_per_s <= 0:
        return {"seconds": 0.0, "busy_cores": math.nan, "ours_cores": math.nan, "others_cores": math.nan,
                "steal_cores": math.nan}
    cores = lambda ticks: ticks / ticks_per_s / seconds  # noqa: E731
    busy, ours = cores(after.busy - before.busy), cores(after.ours - before.ours)
    return {"seconds": round(seconds, 1), "busy_cores": round(busy, 2), "ours_cores": round(ours, 2),
            "others_cores": round(max(busy - ours, 0.0), 2), "steal_cores": round(cores(after.steal - before.steal), 2)}


def cpu_usage_since(before: CpuSnapshot | None) -> dict[str, float] | None:
    """``cpu_usage`` from ``before`` to now; None where there is no /proc to read (either snapshot None)."""
    after = cpu_snapshot()
    return cpu_usage(before, after) if before is not None and after is not None else None


def parse_proc_stat_cpu(line: str) -> tuple[int, int, int]:
    """(busy, steal, total) ticks from the aggregate ``cpu`` line of ``/proc/stat``."""
    fields = [int(v) for v in line.split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq  # guest time is already part of user
    return busy, steal, busy + steal + idle + iowait


def parse_pid_stat(text: str) -> tuple[int, int]:
    """(ppid, utime + stime) from ``/proc/<pid>/stat`` (the command name may hold spaces and ')')."""
    rest = text.rsplit(")", 1)[1].split()
    return int(rest[1]), int(rest[11]) + int(rest[12])


def tree_ticks(root: int, processes: Mapping[int, tuple[int, int]]) -> int:
    """CPU ticks of ``root`` and all its descendants, from {pid: (ppid, ticks)}."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in processes.items():
        children.setdefault(ppid, []).append(pid)
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += processes.get(pid, (0, 0))[1]
        stack.extend(children.get(pid, ()))
    return total


def cpu_snapshot() -> CpuSnapshot | None:
    """Now's ``CpuSnapshot`` (None where ``/proc`` is not there)."""
    try:
        with open("/proc/stat") as f:
            busy, steal, total = parse_proc_stat_cpu(f.readline())
    except OSError:
        return None
    processes: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                processes[int(entry.name)] = parse_pid_stat((entry / "stat").read_text())
            except (OSError, IndexError, ValueError):
                continue  # it exited meanwhile
    return CpuSnapshot(busy, steal, total, tree_ticks(os.getpid(), processes), time.monotonic())
