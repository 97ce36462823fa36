"""Training objectives, side by side: ``hysac`` (hyperbolic), ``safeclip`` (Euclidean unlearning), ``clip`` (baseline),
and the concept-unlearning methods ``cliperase``, ``ac``, ``hac``, ``ga``, ``graddiff``, ``kl`` (:mod:`.unlearning`)."""

from __future__ import annotations

from training import methods
from training.errors import InputError
from training.objectives.base import Batch, Embeddings, LossOutput, Objective
from training.objectives.clip import ClipObjective
from training.objectives.hysac import HySACObjective
from training.objectives.safeclip import DEFAULT_WEIGHTS as SAFECLIP_WEIGHTS
from training.objectives.safeclip import SafeClipObjective
from training.objectives.unlearning import UNLEARNING, UnlearningObjective

_CLASSES: dict[str, type[Objective]] = {
    "hysac": HySACObjective,
    "safeclip": SafeClipObjective,
    "clip": ClipObjective,
    **{cls.name: cls for cls in UNLEARNING},
}
OBJECTIVES: dict[str, type[Objective]] = {name: _CLASSES[name] for name in methods.METHODS}  # methods.py's order
METHODS: tuple[str, ...] = tuple(OBJECTIVES)
FORGETTING: tuple[str, ...] = methods.FORGETTING  # the unlearning methods (clip takes --forget too: the oracle)


def objective_class(method: str) -> type[Objective]:
    try:
        return OBJECTIVES[method]
    except KeyError:
        raise InputError(f"unknown training method {method!r}; use one of {', '.join(METHODS)}") from None


def reference_weights(method: str) -> tuple[float, ...]:
    """The weights the reference code gives ``method``'s loss terms (hysac at eta 1; an unlearning method's are
    :mod:`training.methods`' defaults of its first form)."""
    cls = objective_class(method)
    if cls is SafeClipObjective:
        return SAFECLIP_WEIGHTS
    if issubclass(cls, UnlearningObjective):
        return methods.method(method).default_weights()
    return (1.0,) * len(cls.terms)


def build(
    method: str, *, reference=None, eta: float = 1.0, gather_negatives: bool = False, clip_pairs: str = "safe",
    weights: tuple[float, ...] | None = None, params: dict[str, float] | None = None,
    options: dict[str, str] | None = None,
) -> Objective:
    """The objective for ``method``; ``reference`` (the encoder before training) is needed by safeclip.

    ``weights``: the term weights of hysac or safeclip, in the order of the class's ``terms`` (None:
    the reference's; for hysac ``[1, 1, 1, 1, eta, eta, eta]``). clip has a single term. An unlearning
    method takes its weights by position or by name (``params``: ``alpha=0.5``, ...) and ``options``, its
    choices (both as :mod:`training.methods` lists them); those with a consistency term (cliperase, kl)
    also keep ``reference`` frozen.
    """
    cls = objective_class(method)
    if issubclass(cls, UnlearningObjective):
        return cls(reference, weights=weights, params=params, options=options)
    if params:
        raise InputError(f"named weights (NAME=VALUE) go with the unlearning methods ({', '.join(FORGETTING)}); "
                         f"{method} takes one number per loss term")
    if options:
        raise InputError(f"--objective-option applies to the unlearning methods ({', '.join(FORGETTING)}), not {method}")
    if cls is SafeClipObjective:
        if reference is None:
            raise ValueError("safeclip needs the encoder before training as its frozen reference")
        return SafeClipObjective(reference, weights=weights or SAFECLIP_WEIGHTS)
    if cls is HySACObjective:
        return HySACObjective(eta=eta, weights=weights, gather_negatives=gather_negatives)
    if weights is not None:
        raise ValueError("clip has a single loss term: it takes no weights")
    return ClipObjective(pairs=clip_pairs, gather_negatives=gather_negatives)


__all__ = [
    "Batch", "Embeddings", "LossOutput", "Objective", "ClipObjective", "HySACObjective", "SafeClipObjective",
    "UnlearningObjective", "OBJECTIVES", "METHODS", "FORGETTING", "objective_class", "reference_weights", "build",
]
