"""The mofserve gRPC API, version 1: stubs compiled from ``server/protos/mofserve/v1/mofserve.proto``.

    from mofserve.v1 import mofserve_pb2, mofserve_pb2_grpc

Both the server (``mofserve.server.grpc_service``) and the clients (``mofserve.clients``) import
the stubs from here. They are recompiled on import, with this environment's grpcio-tools,

* in a source checkout, when the .proto is newer than them (an edited .proto never meets stale
  stubs);
* anywhere, when they are missing, or when they do not load because a newer compiler made them
  than the installed protobuf/grpcio runtime accepts (a wheel built in an isolated environment
  with the latest grpcio-tools, installed next to an older pinned protobuf).
"""

from __future__ import annotations

import importlib
import sys
import warnings

from mofserve import protogen as _protogen

_ROOT = _protogen._HERE.parent
_MODULES = ("mofserve_pb2", "mofserve_pb2_grpc")


def _compile(reason: str) -> None:
    try:
        _protogen.generate(_ROOT)
    except (_protogen.ProtoGenError, OSError) as error:
        raise ImportError(f"mofserve.v1: the gRPC stubs are {reason} and could not be compiled ({error}); "
                          "run `python -m mofserve.protogen --force`") from None


def _load() -> None:
    missing = any(not (_protogen.output_dir(_ROOT) / name).is_file() for name in _protogen.GENERATED)
    if missing:
        _compile("missing")
    elif _protogen.in_checkout() and _protogen.is_stale(_ROOT):
        try:
            _protogen.generate(_ROOT)
        except (_protogen.ProtoGenError, OSError) as error:
            warnings.warn(f"mofserve.v1: the .proto is newer than the gRPC stubs and recompiling failed ({error}); "
                          "using the old stubs", RuntimeWarning, stacklevel=3)
    try:
        importlib.import_module(f"{__name__}.mofserve_pb2_grpc")  # imports mofserve_pb2 too
    except (ImportError, RuntimeError, _version_error()) as error:
        for name in _MODULES:
            sys.modules.pop(f"{__name__}.{name}", None)
        _compile(f"incompatible with this protobuf/grpcio ({error})")
        importlib.invalidate_caches()
        importlib.import_module(f"{__name__}.mofserve_pb2_grpc")


def _version_error() -> type[Exception]:
    try:
        from google.protobuf.runtime_version import VersionError
    except ImportError:  # protobuf < 5.26: no runtime check, nothing to catch beyond ImportError
        return ImportError
    return VersionError


_load()
