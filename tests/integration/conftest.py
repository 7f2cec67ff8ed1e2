"""One real Triton per session on the tiny profile's cpu repository (export is cached)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mofserve.export.pipeline import BuiltRepository, export_profile
from mofserve.server.launcher import TritonServer


@pytest.fixture(scope="session")
def tiny_repository(tiny_profile) -> BuiltRepository:
    return export_profile(tiny_profile, target="cpu")


@pytest.fixture(scope="session")
def tiny_triton(tiny_repository: BuiltRepository) -> Iterator[TritonServer]:
    server = TritonServer(tiny_repository.path)
    server.start(timeout=180)
    try:
        yield server
    finally:
        server.stop()
