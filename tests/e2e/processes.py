"""`mofserve` commands as users run them, for the e2e tests: a subprocess started on free ports,
read until its READY line, its later output kept, and its children found by name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest


def start_mofserve(args: list[str], ready_prefix: str = "READY ", env: dict[str, str] | None = None,
                   timeout: float = 240) -> dict:
    """Runs ``python -m mofserve ARGS`` and waits for its ``READY key=value ...`` line.

    Returns ``{"process", "lines", "reader", **ready_fields}``; ``lines`` keeps growing with the
    command's output (stdout and stderr) so tests can read its log. Fails the test with the log's
    tail when the line does not come within ``timeout`` seconds.
    """
    process = subprocess.Popen([sys.executable, "-m", "mofserve", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(ready_prefix):
            ready = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
            reader = threading.Thread(target=lambda: [lines.append(x) for x in process.stdout], daemon=True)
            reader.start()
            return {"process": process, "lines": lines, "reader": reader, **ready}
    process.kill()
    pytest.fail(f"mofserve {args[0]} did not become ready:\n" + "".join(lines[-40:]))


def stop_process(process: subprocess.Popen, grace: float = 60) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(10)
    return process.returncode


def kill_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


def children(pid: int, name: str) -> list[int]:
    """PIDs of ``pid``'s direct children whose command line contains ``name``."""
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", name], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]
