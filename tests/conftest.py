"""Shared fixtures: the tiny profile's seeded checkpoints are built once per session, and one
real tritonserver serves its cpu repository for the integration and e2e tests.

``MOFSERVE_HOME`` (set by the Makefile to ``.mofserve/`` in the checkout) holds the built
artefacts; exports are cached by content digest, so reruns reuse them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mofserve.core.checkpoints import CheckpointPaths, resolve_profile
from mofserve.core.profiles import Profile, get_profile


@pytest.fixture(scope="session")
def tiny_profile() -> Profile:
    return get_profile("tiny")


@pytest.fixture(scope="session")
def tiny_paths(tiny_profile: Profile) -> CheckpointPaths:
    return resolve_profile(tiny_profile)


@pytest.fixture(scope="session")
def tiny_repository(tiny_profile):
    from mofserve.export.pipeline import export_profile

    return export_profile(tiny_profile, target="cpu")


@pytest.fixture(scope="session")
def tiny_triton(tiny_repository) -> Iterator:
    from mofserve.server.launcher import TritonServer

    server = TritonServer(tiny_repository.path)
    server.start(timeout=180)
    try:
        yield server
    finally:
        server.stop()
