"""Shared fixtures: one tiny world per test session (about 2 s to build)."""

from __future__ import annotations

import pytest

from preftune.tinyworld import World, build_world


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The default tiny world (256 train / 64 eval sorting pairs, 2-layer Llama), built once, read-only."""
    return build_world(tmp_path_factory.mktemp("tiny_world"))
