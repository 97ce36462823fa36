"""Safety traversal: move unsafe query embeddings toward the origin, and calibrate when to.

HySAC places safe content near the origin of the hyperboloid and unsafe content farther out. An
embedding whose distance to the origin ``d0`` exceeds a threshold is treated as unsafe and slid
along its geodesic through the origin, so it keeps its direction (its context) but lands where safe
content of the *target* modality lives.

Two variants, both batched:
- ``hysac`` reproduces the reference code exactly: threshold ``ub' = ub + tanh((ub - 0.8)/c) + 1``
  with ``ub`` the p95 of the target modality's safe class; triggered rows get their space components
  rescaled to Euclidean norm ``ub'`` (which lands them at geodesic radius ``asinh(sqrt(c) ub')/sqrt(c)``).
- ``geodesic`` (default) triggers on the artifact's calibrated unsafe threshold for the *query's*
  modality and moves triggered rows to exactly geodesic distance ``target`` from the origin, where
  ``target`` is a statistic (default p50) of the target modality's safe class.

Bounds classes: S = safe text, V = safe image, U = unsafe text, G = unsafe (generated) image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

from training import lorentz
from training.errors import InputError

Method = Literal["hysac", "geodesic"]
METHODS: tuple[str, ...] = ("hysac", "geodesic")
SAFE_CLASS = {"text": "S", "image": "V"}
UNSAFE_CLASS = {"text": "U", "image": "G"}
STATS = ("mean", "p05", "p50", "p95")
HYSAC_ALPHA = 0.8


@dataclass
class Traversal:
    """Result of traversing a batch: the moved embeddings and a per-row report."""

    vectors: Tensor  # (B, D) space components after the move (unchanged rows where not triggered)
    d0_before: Tensor  # (B,)
    d0_after: Tensor  # (B,)
    triggered: Tensor  # (B,) bool
    threshold: float

    def report(self, i: int) -> dict:
        return {
            "triggered": bool(self.triggered[i]),
            "threshold": self.threshold,
            "distance_to_origin": float(self.d0_before[i]),
            "distance_to_origin_after": float(self.d0_after[i]),
        }


def hysac_threshold(ub: float, curvature: float, alpha: float = HYSAC_ALPHA) -> float:
    """The reference trigger ``ub + tanh((ub - alpha)/c) + 1``."""
    return ub + math.tanh((ub - alpha) / curvature) + 1.0


def _bound(bounds: dict, cls: str, stat: str) -> float:
    try:
        return float(bounds[cls][stat])
    except (KeyError, TypeError) as e:
        raise InputError(
            f"the artifact's bounds lack {cls}.{stat}; calibrate them first ('safe-retrieval model calibrate')"
        ) from e


def traverse(
    x: Tensor,
    curvature: float,
    bounds: dict,
    *,
    target: Literal["text", "image"],
    method: Method = "geodesic",
    threshold: float | None = None,
    target_stat: str = "p50",
    d0: Tensor | None = None,
) -> Traversal:
    """Traverse a batch of space components ``x (B, D)`` toward the origin.

    ``target`` is the modality being searched (its safe class sets where rows land).
    ``threshold`` is the trigger distance; pass the artifact's unsafe threshold for the query's
    modality. Without it, the hysac trigger for the target modality is used (the reference's: hysac
    itself is only run that way; the threshold sweep varies it). ``d0 (B,)``: the rows' distances
    to the origin where the caller has them already; computed here otherwise.
    """
    if method not in METHODS:
        raise InputError(f"unknown traversal {method!r}; use one of {', '.join(METHODS)}")
    x = x.float()
    d0 = lorentz.dist0(x, curvature) if d0 is None else d0.float()
    safe = SAFE_CLASS[target]
    if method == "hysac":
        ub = threshold if threshold is not None else hysac_threshold(_bound(bounds, safe, "p95"), curvature)
        trig = is_unsafe(d0, ub)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-8)
        moved = torch.where(trig.unsqueeze(-1), x * (ub / norm), x)
        thr = ub
    else:
        thr = threshold if threshold is not None else hysac_threshold(_bound(bounds, safe, "p95"), curvature)
        goal = min(_landing(bounds, safe, target_stat), thr)
        trig = is_unsafe(d0, thr)
        moved = torch.where(trig.unsqueeze(-1), lorentz.move_to_dist0(x, goal, curvature), x)
    return Traversal(moved, d0, lorentz.dist0(moved, curvature), trig, float(thr))


def _landing(bounds: dict, cls: str, stat: str) -> float:
    """Where triggered rows land; released HySAC bounds have no p50, so their mean stands in for it."""
    row = bounds.get(cls) if isinstance(bounds.get(cls), dict) else {}
    if stat == "p50" and "p50" not in row and "mean" in row:
        stat = "mean"
    return _bound(bounds, cls, stat)


def class_bounds(d0: np.ndarray | Tensor) -> dict[str, float]:
    """mean/p05/p50/p95 of one class's distances to the origin."""
    d = _np(d0)
    if d.size == 0:
        raise InputError("cannot calibrate bounds from an empty class")
    p05, p50, p95 = np.percentile(d, [5, 50, 95])
    return {"mean": float(d.mean()), "p05": float(p05), "p50": float(p50), "p95": float(p95)}


def calibrate_bounds(d0_by_class: dict[str, np.ndarray | Tensor]) -> dict[str, dict[str, float]]:
    """Bounds for each of S, V, U, G present in ``d0_by_class``."""
    return {cls: class_bounds(d) for cls, d in d0_by_class.items() if cls in ("S", "V", "U", "G")}


def best_threshold(safe: np.ndarray | Tensor, unsafe: np.ndarray | Tensor) -> float:
    """The distance that best separates safe from unsafe (max balanced accuracy, midpoint of the gap)."""
    s, u = np.sort(_np(safe)), np.sort(_np(unsafe))
    if s.size == 0 or u.size == 0:
        raise InputError("threshold calibration needs both safe and unsafe embeddings")
    cands = np.unique(np.concatenate([s, u]))
    mids = np.concatenate([[cands[0] - 1e-6], (cands[:-1] + cands[1:]) / 2, [cands[-1] + 1e-6]])
    tpr = 1 - np.searchsorted(u, mids, side="right") / u.size  # unsafe above the threshold
    tnr = np.searchsorted(s, mids, side="right") / s.size  # safe at or below it
    return float(mids[int(np.argmax(tpr + tnr))])


def calibrate_thresholds(d0_by_class: dict[str, np.ndarray | Tensor]) -> dict[str, float]:
    """Unsafe thresholds per modality from labelled distances: text from S vs U, image from V vs G."""
    out = {}
    for modality in ("text", "image"):
        s, u = SAFE_CLASS[modality], UNSAFE_CLASS[modality]
        if s in d0_by_class and u in d0_by_class:
            out[modality] = best_threshold(d0_by_class[s], d0_by_class[u])
    return out


def thresholds_from_bounds(bounds: dict, curvature: float) -> dict[str, float]:
    """Thresholds when only bounds are known (released HySAC weights): the reference trigger per modality."""
    out = {}
    for modality, cls in SAFE_CLASS.items():
        if cls in bounds and "p95" in bounds[cls]:
            out[modality] = hysac_threshold(float(bounds[cls]["p95"]), curvature)
    return out


@overload
def is_unsafe(d0: Tensor, threshold: float | None) -> Tensor | None: ...
@overload
def is_unsafe(d0: float, threshold: float | None) -> bool | None: ...
def is_unsafe(d0: Tensor | float, threshold: float | None) -> Tensor | bool | None:
    """The unsafe rule: ``d0 > threshold``; None when the artifact has no calibrated threshold."""
    return None if threshold is None else d0 > threshold


def _np(a) -> np.ndarray:
    return np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=np.float64)
