"""Small models the tests make themselves."""

from __future__ import annotations

from pathlib import Path

import torch

from training import architectures, artifact
from training.encoder import SafetyEncoder


def random_tiny_artifacts(root: Path) -> dict[str, Path]:
    """geometry -> a randomly initialised (seed 0) tiny artifact under ``root``."""
    out = {}
    for geometry in ("euclidean", "lorentz"):
        torch.manual_seed(0)
        out[geometry] = artifact.save(artifact.Artifact(SafetyEncoder(architectures.resolve("tiny"), geometry)),
                                      root / geometry)
    return out
