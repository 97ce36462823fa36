"""Fixtures of the indexer tests: calibrated tiny artifacts and a small image folder (helpers: tests/helpers/indexer.py).

Everything is made here (no downloads) and kept tiny: the whole indexer suite must stay well under
90 s on a loaded 2-core machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.indexer import make_artifact, write_images
from training import artifact


@pytest.fixture(scope="session")
def art(tmp_path_factory) -> artifact.Artifact:
    """A calibrated tiny lorentz artifact (bounds + unsafe thresholds), saved so it has a fingerprint."""
    return make_artifact(tmp_path_factory.mktemp("art") / "tiny")


@pytest.fixture(scope="session")
def other_art(tmp_path_factory) -> artifact.Artifact:
    """Another tiny lorentz artifact (different seed, so a different fingerprint)."""
    return make_artifact(tmp_path_factory.mktemp("art2") / "tiny2", seed=1)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """12 good images (4 in sub/), one corrupt JPEG and one text file that must be ignored."""
    root = tmp_path_factory.mktemp("images")
    write_images(root, 12)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root
