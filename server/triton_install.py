"""Find the Triton installation that ``tritonserver`` runs from, and prepare what it needs to run.

Why this is its own module, apart from :mod:`mofserve.server.launcher` (which starts and stops the
process): where an installation keeps its files (the ``nvidia-pytriton`` wheel's layout, or a full
installation's) and what its python backend stub needs are facts about the distribution, not about
the process, and they change for other reasons (a new wheel, NGC's image). This module owns them:

* a backend directory whose ``python/`` folder holds the python backend library *and* the stub
  built for the running interpreter (the wheel keeps one stub per Python version elsewhere);
* an environment in which that stub embeds *this* venv's interpreter (venv ``bin`` first on
  ``PATH``) and finds the wheel's bundled shared libraries (``LD_LIBRARY_PATH``).

``MOFSERVE_TRITONSERVER_ROOT`` (:data:`TRITON_ROOT_ENV`) runs a full installation instead, such as
``/opt/tritonserver`` in NGC's image: its own ``backends/`` (python, tensorrt, onnxruntime) are used
as they are.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import importlib.util
import os
import secrets
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PYTRITON_REQUIREMENT",
    "TRITON_ROOT_ENV",
    "TritonInstall",
    "TritonNotInstalledError",
    "default_cache_root",
    "find_tritonserver",
    "prepare_backend_directory",
    "triton_environment",
]

#: The wheel that carries the Triton binaries; named in every "not installed" error.
PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"

#: Names a full Triton installation to run instead of the wheel's, e.g. ``/opt/tritonserver`` in
#: NGC's ``tritonserver`` image (its TensorRT and ONNX Runtime backends serve the gpu targets).
TRITON_ROOT_ENV = "MOFSERVE_TRITONSERVER_ROOT"


class TritonNotInstalledError(RuntimeError):
    """The ``tritonserver`` binary (shipped by ``nvidia-pytriton``) cannot be found."""


# --------------------------------------------------------------------------------------------
# Locating the installation and preparing the backend directory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TritonInstall:
    """Paths of the Triton server distribution inside the ``nvidia-pytriton`` wheel.

    Kept as data (not looked up ad hoc) so that tests can point a :class:`TritonServer` at a fake
    installation and so that error messages can name exactly which file is missing.
    """

    root: Path
    """``site-packages/pytriton/tritonserver``."""
    binary: Path
    """The ``tritonserver`` executable."""
    backend_source_dir: Path
    """``backends/python``: ``libtriton_python.so`` and ``triton_python_backend_utils.py``."""
    stubs_dir: Path
    """``python_backend_stubs``: one ``<major.minor>/triton_python_backend_stub`` per Python."""
    caches_dir: Path
    """``caches``: passed as ``--cache-directory`` (holds ``local/libtritoncache_local.so``)."""
    libs_dir: Path
    """``site-packages/nvidia_pytriton.libs``: vendored shared libraries (libcudart, ...)."""
    version: str = "unknown"
    """Version of the ``nvidia-pytriton`` distribution, for cache keys and messages."""
    backends_dir: Path | None = None
    """A complete ``--backend-directory`` used as it is (a full installation, see
    :data:`TRITON_ROOT_ENV`); None: assemble ``python/`` from the wheel's files."""

    def stub_path(self, python_version: str | None = None) -> Path:
        """The python-backend stub for ``python_version`` (default: the running interpreter).

        The stub embeds libpython, so it must match the interpreter whose venv the models use.
        """
        version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.stubs_dir / version / "triton_python_backend_stub"


def find_tritonserver() -> TritonInstall:
    """Locate the Triton server shipped by ``nvidia-pytriton`` without importing ``pytriton``.

    ``find_spec`` is used rather than a hard-coded path so that any venv layout works, and rather
    than ``import pytriton`` because importing it pulls in much more than we need.

    Raises:
        TritonNotInstalledError: the wheel, or a file of it that we need, is missing.
    """
    native = os.environ.get(TRITON_ROOT_ENV)
    if native:
        return native_install(Path(native))
    hint = f"install it with `pip install {PYTRITON_REQUIREMENT}` (it ships the tritonserver binary)"
    spec = importlib.util.find_spec("pytriton")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise TritonNotInstalledError(f"the `pytriton` package is not installed; {hint}")
    package_dir = Path(locations[0])
    root = package_dir / "tritonserver"
    libs_dir = package_dir.parent / "nvidia_pytriton.libs"
    if not libs_dir.is_dir():  # an editable pytriton checkout keeps them here instead
        libs_dir = root / "external_libs"
    try:
        version = importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    install = TritonInstall(
        root=root,
        binary=root / "bin" / "tritonserver",
        backend_source_dir=root / "backends" / "python",
        stubs_dir=root / "python_backend_stubs",
        caches_dir=root / "caches",
        libs_dir=libs_dir,
        version=version,
    )
    required = (
        install.binary,
        install.backend_source_dir / "libtriton_python.so",
        install.backend_source_dir / "triton_python_backend_utils.py",
        install.stubs_dir,
        install.libs_dir,
    )
    missing = [str(path) for path in required if not path.exists()]
    if missing:
        raise TritonNotInstalledError(f"nvidia-pytriton {version} at {package_dir} lacks {', '.join(missing)}; {hint}")
    return install


def native_install(root: Path) -> TritonInstall:
    """A full Triton installation (``<root>/bin/tritonserver``, ``<root>/backends/<name>/``), such as
    ``/opt/tritonserver`` in NGC's image, whose python backend stub embeds the system Python."""
    root = Path(root)
    version_file = root / "TRITON_VERSION"
    python_dir = root / "backends" / "python"
    install = TritonInstall(
        root=root,
        binary=root / "bin" / "tritonserver",
        backend_source_dir=python_dir,
        stubs_dir=python_dir,
        caches_dir=root / "caches",
        libs_dir=root / "lib",
        version=version_file.read_text().strip() if version_file.is_file() else "unknown",
        backends_dir=root / "backends",
    )
    required = (install.binary, python_dir / "libtriton_python.so", python_dir / "triton_python_backend_stub")
    missing = [str(path) for path in required if not path.exists()]
    if missing:
        raise TritonNotInstalledError(f"{TRITON_ROOT_ENV}={root} is not a Triton installation: "
                                      f"it lacks {', '.join(missing)}")
    return install


def default_cache_root() -> Path:
    """Where the prepared backend directory is kept between runs.

    ``MOFSERVE_CACHE_DIR`` wins (CI and tests can isolate it), then ``$XDG_CACHE_HOME/mofserve``,
    then ``~/.cache/mofserve``.
    """
    explicit = os.environ.get("MOFSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mofserve"


def _backend_entries(install: TritonInstall) -> dict[str, Path]:
    """Name in ``<backend dir>/python`` -> file it links to."""
    return {
        "libtriton_python.so": install.backend_source_dir / "libtriton_python.so",
        "triton_python_backend_utils.py": install.backend_source_dir / "triton_python_backend_utils.py",
        "triton_python_backend_stub": install.stub_path(),
    }


def _backend_dir_is_complete(backend_dir: Path, entries: Mapping[str, Path]) -> bool:
    python_dir = backend_dir / "python"
    # Path.exists follows symlinks, so a dangling link (venv moved or rebuilt) counts as missing.
    return all((python_dir / name).exists() for name in entries)


def prepare_backend_directory(cache_root: Path, install: TritonInstall | None = None) -> Path:
    """Build (once) a ``--backend-directory`` whose ``python/`` holds backend, utils and stub.

    Triton looks for the python backend stub next to ``libtriton_python.so``, while the wheel keeps
    stubs per Python version in another folder; so we assemble ``<dir>/python/`` from symlinks.

    The directory name carries a hash of the source paths and the Python version, so a different
    venv or interpreter gets its own directory. It is built in a temporary sibling and renamed
    into place: concurrent callers (pytest-xdist, two servers) either win the rename or find the
    finished directory, never a half-built one. A stale directory (dangling links) is moved aside
    and rebuilt. The name deliberately avoids ``triton``: a folder of that name on ``sys.path``
    would shadow the ``triton`` package that torch imports.

    Returns:
        The directory to pass as ``--backend-directory``.
    """
    install = install or find_tritonserver()
    entries = _backend_entries(install)
    stub = entries["triton_python_backend_stub"]
    if not stub.exists():
        available = sorted(p.name for p in install.stubs_dir.iterdir()) if install.stubs_dir.is_dir() else []
        raise TritonNotInstalledError(
            f"nvidia-pytriton {install.version} has no python backend stub for Python "
            f"{sys.version_info.major}.{sys.version_info.minor} (expected {stub}; available: {available})"
        )
    key_source = "\n".join(f"{name}={path.resolve()}" for name, path in sorted(entries.items()))
    key = hashlib.sha256(key_source.encode()).hexdigest()[:12]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    cache_root = Path(cache_root)
    final = cache_root / f"tritonserver_backends-{install.version}-{py}-{key}"
    if _backend_dir_is_complete(final, entries):
        return final

    cache_root.mkdir(parents=True, exist_ok=True)
    if final.exists():  # stale or half-deleted: move aside atomically, then delete at leisure
        trash = cache_root / f".trash-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
        with contextlib.suppress(FileNotFoundError):
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_root))
    try:
        (tmp / "python").mkdir()
        for name, source in entries.items():
            (tmp / "python" / name).symlink_to(source.resolve())
        try:
            tmp.rename(final)
        except OSError as exc:
            # Another process renamed its copy into place first: theirs is as good as ours.
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _backend_dir_is_complete(final, entries):
        raise RuntimeError(f"could not prepare the Triton backend directory {final}")
    return final


# --------------------------------------------------------------------------------------------
# The environment tritonserver and its stubs run with
# --------------------------------------------------------------------------------------------


def triton_environment(install: TritonInstall, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for ``tritonserver`` and the python backend stubs it spawns.

    * The venv's ``bin`` goes first on ``PATH``: the stub locates the Python it embeds from
      ``PATH``; with another ``python3`` first it fails with ``No module named 'numpy'``.
    * ``LD_LIBRARY_PATH`` gets the wheel's vendored libraries (else ``libcudart-*.so: cannot open
      shared object file``) and the interpreter's ``LIBDIR`` (so the stub loads the same
      ``libpython`` as this venv's interpreter).
    * OpenMP threads spin only briefly (``OMP_WAIT_POLICY=PASSIVE`` with ``GOMP_SPINCOUNT=20000``,
      each unless set): every python-backend model is its own process with its own OpenMP pool
      (PyTorch), and pools that spin long steal the few cores from each other, while pools that
      never spin pay a wake-up between every two operations. ``small`` on the 2-vCPU machines
      (docs/benchmarks.md): OpenMP's default 2.19 req/s at c=1 and 1.5-1.8 at c=2; ACTIVE 0.3;
      PASSIVE alone 2.0 at c=1 (p50 +5-10%) and 2.4-2.6 at c=2; PASSIVE + 20000 spins 2.35 at
      c=1 (p50 = the in-process pipeline's) and 2.2 at c=2.

    ``env`` entries override the inherited ``os.environ``; ``PATH`` and ``LD_LIBRARY_PATH`` given
    there are kept, with the required entries put in front.
    """
    result = dict(os.environ)
    result.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    result.setdefault("GOMP_SPINCOUNT", "20000")
    if env:
        result.update(env)
    venv_bin = str(Path(sys.executable).parent)
    path_entries = [venv_bin, *[p for p in result.get("PATH", os.defpath).split(os.pathsep) if p]]
    result["PATH"] = os.pathsep.join(dict.fromkeys(path_entries))
    lib_entries = [str(install.libs_dir)]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        lib_entries.append(str(libdir))
    lib_entries += [p for p in result.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    result["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(lib_entries))
    return result
