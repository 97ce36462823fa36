"""Fixtures shared across the suite; the plain helpers live in tests/helpers/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import gates
from tests.helpers.cli import run_cli

GATES = pytest.StashKey[gates.Background]()


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: only gates that will run start the training
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The quality gates run last, and their models train in the background from here on (tests/helpers/gates.py)."""
    marked = [i for i in items if i.get_closest_marker("gates")]
    if not marked or config.option.collectonly:
        return
    ids = {id(i) for i in marked}
    items[:] = [i for i in items if id(i) not in ids] + marked
    config.stash[GATES] = gates.Background()


def pytest_sessionfinish(session: pytest.Session) -> None:
    background = session.config.stash.get(GATES, None)
    if background is not None:
        background.stop()


@pytest.fixture(scope="session")
def gate_models(pytestconfig: pytest.Config) -> dict[str, Path]:
    """label -> artifact (and ``data`` -> the demo dataset) of tests/helpers/gates.py, once trained."""
    background = pytestconfig.stash.get(GATES, None)
    assert background is not None, "the gate models start training when gates are collected"
    return background.wait()
