"""Fixtures shared across the suite; the plain helpers live in tests/helpers/."""

from __future__ import annotations

import pytest

from tests.helpers.cli import run_cli


@pytest.fixture(scope="session")
def cli():
    return run_cli
