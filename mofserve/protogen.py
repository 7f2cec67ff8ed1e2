"""Compile the gRPC API (``server/protos/mofserve/v1/mofserve.proto``) into ``mofserve.v1``.

The generated modules (``mofserve_pb2.py``, ``mofserve_pb2_grpc.py``, ``mofserve_pb2.pyi``) are
build outputs: git-ignored, never edited by hand. They are written

* by ``make install`` (``python -m mofserve.protogen``) in a checkout installed in editable mode,
* by ``setup.py``'s ``build_py`` hook into the wheel for a plain ``pip install .``,
* and again on import of ``mofserve.v1``: in a checkout whenever the .proto is newer than the
  generated files (so an edited proto never meets stale stubs), anywhere when they are missing
  or were made by a compiler newer than the installed protobuf/grpcio runtime accepts.

This module is also loaded by ``setup.py`` straight from its file, before ``mofserve`` is
installed, so it imports nothing of the project and ``grpc_tools`` only when compiling.

    python -m mofserve.protogen            # compile if missing or stale
    python -m mofserve.protogen --force    # compile anyway
    python -m mofserve.protogen --check    # exit 1 if missing or stale
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

PROTO_RELPATH = Path("mofserve/v1/mofserve.proto")  # relative to the proto root (= its import path)
GENERATED = ("mofserve_pb2.py", "mofserve_pb2_grpc.py", "mofserve_pb2.pyi")

_HERE = Path(__file__).resolve().parent  # the folder of the `mofserve` package
# A source checkout: <root>/mofserve/protogen.py and <root>/server/protos/...
_CHECKOUT_PROTO_ROOT = _HERE.parent / "server" / "protos"
# An installed distribution: site-packages/mofserve/server/protos/... (package data)
_INSTALLED_PROTO_ROOT = _HERE / "server" / "protos"


class ProtoGenError(RuntimeError):
    """The .proto could not be compiled (or the compiler is missing)."""


def proto_root() -> Path | None:
    """The folder the .proto is imported from: the checkout's first, else the installed copy."""
    for root in (_CHECKOUT_PROTO_ROOT, _INSTALLED_PROTO_ROOT):
        if (root / PROTO_RELPATH).is_file():
            return root
    return None


def in_checkout() -> bool:
    return (_CHECKOUT_PROTO_ROOT / PROTO_RELPATH).is_file()


def output_dir(output_root: Path) -> Path:
    """Where the generated modules land under ``output_root`` (a folder holding ``mofserve/``)."""
    return output_root / PROTO_RELPATH.parent


def is_stale(output_root: Path, root: Path | None = None) -> bool:
    """True when a generated file is missing or older than the .proto."""
    root = root or proto_root()
    if root is None:
        return False
    proto_mtime = (root / PROTO_RELPATH).stat().st_mtime
    for name in GENERATED:
        path = output_dir(output_root) / name
        if not path.is_file() or path.stat().st_mtime < proto_mtime:
            return True
    return False


def generate(output_root: Path, root: Path | None = None) -> list[Path]:
    """Compile the .proto into ``output_root/mofserve/v1/``; returns the written files.

    Compiles into a scratch folder first and moves each file into place with an atomic rename,
    so a process importing the stubs meanwhile sees whole files.
    """
    root = root or proto_root()
    if root is None:
        raise ProtoGenError(f"{PROTO_RELPATH}: not found under {_CHECKOUT_PROTO_ROOT} or {_INSTALLED_PROTO_ROOT}")
    try:
        from grpc_tools import protoc
    except ImportError:
        raise ProtoGenError("grpcio-tools is needed to compile the gRPC API: pip install grpcio-tools") from None
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    target = output_dir(output_root)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".protogen-") as scratch:
        args = ["grpc_tools.protoc", f"-I{root}", f"-I{well_known}", f"--python_out={scratch}",
                f"--pyi_out={scratch}", f"--grpc_python_out={scratch}", str(root / PROTO_RELPATH)]
        if protoc.main(args) != 0:
            raise ProtoGenError(f"protoc failed on {root / PROTO_RELPATH} (see the messages above)")
        written = []
        for name in GENERATED:
            produced = Path(scratch) / PROTO_RELPATH.parent / name
            os.replace(produced, target / name)
            written.append(target / name)
    # bytecode of the old stubs: its check is by mtime in whole seconds and size, which a quick
    # recompile (same second, same length) would pass
    for cached in (target / "__pycache__").glob("mofserve_pb2*.pyc"):
        cached.unlink(missing_ok=True)
    return written


def ensure_current(output_root: Path | None = None, force: bool = False) -> list[Path]:
    """Compile if forced, missing or stale; returns the files written (empty when current)."""
    output_root = output_root or _HERE.parent
    if force or is_stale(output_root):
        return generate(output_root)
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mofserve.protogen", description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="compile even when the stubs are current")
    parser.add_argument("--check", action="store_true", help="exit 1 if the stubs are missing or stale")
    parser.add_argument("--output-root", type=Path, default=_HERE.parent,
                        help="folder that holds mofserve/ (default: where this package lives)")
    args = parser.parse_args(argv)
    if args.check:
        stale = is_stale(args.output_root)
        print(f"{output_dir(args.output_root)}: {'missing or stale' if stale else 'current'}")
        return 1 if stale else 0
    try:
        written = ensure_current(args.output_root, force=args.force)
    except ProtoGenError as error:
        print(f"protogen: error: {error}", file=sys.stderr)
        return 1
    print("\n".join(str(p) for p in written) if written else f"{output_dir(args.output_root)}: current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
