"""What one Triton server claims on the machine, chosen so that servers never collide: its three
ports (picked free together, so the kernel cannot hand out one port twice) and its python-backend
shared-memory prefix (unique per server, so that stopping one deletes exactly its ``/dev/shm``
regions and nobody else's, even after a SIGKILL left them behind).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from pathlib import Path
from typing import NamedTuple

#: Where POSIX shared memory lives on Linux; a module attribute so tests can point it elsewhere.
SHM_DIR = Path("/dev/shm")




class TritonPorts(NamedTuple):
    """The three ports one Triton server listens on."""

    http: int
    grpc: int
    metrics: int


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that are free on ``host`` right now.

    All sockets are held open until every port is chosen, so the kernel cannot hand out the same
    port twice. A port can still be taken between this call and Triton binding it;
    :meth:`TritonServer.start` retries with fresh ports when that happens.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (see :func:`free_ports` for the caveat)."""
    return free_ports(1, host)[0]


def new_shm_prefix() -> str:
    """A ``/dev/shm`` name prefix unique to one server: ``mofserve_<pid>_<random>_``.

    The python backend names its regions ``<prefix><uuid>``; a unique prefix lets ``stop()``
    delete exactly this server's regions, even after a crash, without touching other servers'.
    """
    return f"mofserve_{os.getpid()}_{secrets.token_hex(4)}_"


def cleanup_stale_shm(prefix: str, shm_dir: Path | None = None) -> list[Path]:
    """Delete the shared-memory regions whose names start with ``prefix``; return what went.

    A server killed with SIGKILL (or whose stubs were) never unlinks its regions, and
    ``/dev/shm`` is a RAM-backed tmpfs of limited size, so leftovers accumulate across test runs.
    An empty prefix, or one containing ``/``, is refused: it would match other programs' regions.
    """
    if not prefix or "/" in prefix or prefix in (".", ".."):
        raise ValueError(f"refusing to clean shared memory with prefix {prefix!r}")
    directory = SHM_DIR if shm_dir is None else shm_dir
    removed: list[Path] = []
    try:
        candidates = list(directory.iterdir())
    except FileNotFoundError:
        return removed
    for path in candidates:
        if path.name.startswith(prefix):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
