"""Shared fixtures: the tiny profile's seeded checkpoints are built once per session.

``MOFSERVE_HOME`` (set by the Makefile to ``.mofserve/`` in the checkout) holds the built
artefacts; exports are cached by content digest, so reruns reuse them.
"""

from __future__ import annotations

import pytest

from mofserve.core.checkpoints import CheckpointPaths, resolve_profile
from mofserve.core.profiles import Profile, get_profile


@pytest.fixture(scope="session")
def tiny_profile() -> Profile:
    return get_profile("tiny")


@pytest.fixture(scope="session")
def tiny_paths(tiny_profile: Profile) -> CheckpointPaths:
    return resolve_profile(tiny_profile)
