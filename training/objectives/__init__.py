"""Training objectives, side by side: ``hysac`` (hyperbolic), ``safeclip`` (Euclidean unlearning), ``clip`` (baseline)."""

from __future__ import annotations

from training.errors import InputError
from training.objectives.base import Batch, Embeddings, LossOutput, Objective
from training.objectives.clip import ClipObjective
from training.objectives.hysac import HySACObjective
from training.objectives.safeclip import DEFAULT_WEIGHTS as DEFAULT_SAFECLIP_WEIGHTS
from training.objectives.safeclip import SafeClipObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "hysac": HySACObjective,
    "safeclip": SafeClipObjective,
    "clip": ClipObjective,
}
METHODS: tuple[str, ...] = tuple(OBJECTIVES)


def objective_class(method: str) -> type[Objective]:
    try:
        return OBJECTIVES[method]
    except KeyError:
        raise InputError(f"unknown training method {method!r}; use one of {', '.join(METHODS)}") from None


def build(
    method: str, *, reference=None, eta: float = 1.0, gather_negatives: bool = False, clip_pairs: str = "safe",
    safeclip_weights: tuple[float, ...] | None = None,
) -> Objective:
    """The objective for ``method``; ``reference`` (the encoder before training) is needed by safeclip.

    ``safeclip_weights``: Safe-CLIP's eight term weights (None: the reference's defaults).
    """
    cls = objective_class(method)
    if cls is SafeClipObjective:
        if reference is None:
            raise ValueError("safeclip needs the encoder before training as its frozen reference")
        return SafeClipObjective(reference, weights=safeclip_weights or DEFAULT_SAFECLIP_WEIGHTS)
    if cls is HySACObjective:
        return HySACObjective(eta=eta, gather_negatives=gather_negatives)
    return ClipObjective(pairs=clip_pairs, gather_negatives=gather_negatives)


__all__ = [
    "Batch", "Embeddings", "LossOutput", "Objective", "ClipObjective", "HySACObjective", "SafeClipObjective",
    "OBJECTIVES", "METHODS", "objective_class", "build",
]
