"""Safety traversal (hysac and geodesic variants) and calibration of bounds and thresholds."""

import math

import numpy as np
import pytest
import torch

from training import lorentz, traversal
from training.errors import InputError

BOUNDS = {"S": {"mean": 0.8, "p05": 0.5, "p50": 0.8, "p95": 1.0},
          "V": {"mean": 1.1, "p05": 0.9, "p50": 1.1, "p95": 1.3}}


def spread(c=1.0):
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    radii = torch.tensor([0.5, 1.0, 2.0, 2.5, 3.0, 4.0])
    return lorentz.move_to_dist0(directions, radii, c), radii


def test_hysac_variant_reproduces_the_reference_rule():
    c = 0.7
    x, radii = spread(c)
    out = traversal.traverse(x, c, BOUNDS, target="image", method="hysac")
    ub = 1.3 + math.tanh((1.3 - 0.8) / c) + 1
    assert out.threshold == pytest.approx(ub)
    assert torch.equal(out.triggered, radii > ub)
    moved = out.vectors[out.triggered]
    # the reference rescales the *Euclidean norm* of the space components to ub'
    assert torch.allclose(moved.norm(dim=-1), torch.full((len(moved),), ub), rtol=1e-5)
    assert torch.equal(out.vectors[~out.triggered], x[~out.triggered])


def test_geodesic_variant_lands_exactly_on_the_target_distance_keeping_direction():
    c = 1.0
    x, radii = spread(c)
    out = traversal.traverse(x, c, BOUNDS, target="image", threshold=1.8)
    assert torch.equal(out.triggered, radii > 1.8)
    assert torch.allclose(out.d0_after[out.triggered], torch.full((int(out.triggered.sum()),), 1.1), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(out.vectors, x, dim=-1)
    assert torch.allclose(cos, torch.ones(6), atol=1e-6)
    assert out.report(5) == {"triggered": True, "threshold": 1.8, "distance_to_origin": pytest.approx(4.0, rel=1e-5),
                             "distance_to_origin_after": pytest.approx(1.1, rel=1e-5)}


def test_target_modality_decides_the_bound():
    x, _ = spread()
    to_text = traversal.traverse(x, 1.0, BOUNDS, target="text", threshold=1.8)
    assert torch.allclose(to_text.d0_after[to_text.triggered], torch.tensor(0.8), atol=1e-5)


def test_missing_bounds_and_bad_method_are_explained():
    x, _ = spread()
    with pytest.raises(InputError, match="calibrate"):
        traversal.traverse(x, 1.0, {}, target="image")
    with pytest.raises(InputError, match="geodesic"):
        traversal.traverse(x, 1.0, BOUNDS, target="image", method="teleport")


def test_calibration_orders_classes_and_separates_them():
    rng = np.random.default_rng(0)
    d = {"S": rng.normal(1.0, 0.1, 500), "V": rng.normal(1.5, 0.1, 500),
         "U": rng.normal(2.0, 0.1, 500), "G": rng.normal(2.5, 0.1, 500)}
    bounds = traversal.calibrate_bounds(d)
    assert [bounds[c]["p50"] for c in "SVUG"] == sorted(bounds[c]["p50"] for c in "SVUG")
    assert bounds["S"]["p05"] < bounds["S"]["p50"] < bounds["S"]["p95"]
    thr = traversal.calibrate_thresholds(d)
    assert 1.2 < thr["text"] < 1.8 and 1.7 < thr["image"] < 2.3
    flags = traversal.is_unsafe(torch.tensor([1.0, 2.1]), thr["text"])
    assert flags.tolist() == [False, True]
    assert traversal.is_unsafe(torch.tensor([5.0]), None) is None


def test_best_threshold_perfect_split():
    assert 3.0 < traversal.best_threshold([1, 2, 3], [4, 5, 6]) < 4.0
    with pytest.raises(InputError):
        traversal.best_threshold([], [1.0])
