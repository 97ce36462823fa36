"""Fixtures of the service tests (a calibrated tiny model and an indexed gallery, a shared server);
the helpers that build them live in tests/helpers/service.py."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.helpers.service import N_QUADS, LiveServer, World, build_index, calibrated_tiny, live, settings_for


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    from training.data import synthetic

    root = tmp_path_factory.mktemp("service-world")
    data = root / "data"
    synthetic.generate(data, n=N_QUADS, seed=0)
    thresholds = calibrated_tiny(data, root / "model")
    generation = build_index(root / "model", data, root / "indexes")
    return World(root, data, root / "model", root / "indexes", thresholds, generation)


@pytest.fixture(scope="module")
def server(world, tmp_path_factory) -> Iterator[LiveServer]:
    """One read-only server shared by a test module."""
    with live(settings_for(world, tmp_path_factory.mktemp("server"))) as s:
        yield s
