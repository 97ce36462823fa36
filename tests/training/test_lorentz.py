"""Identities of the Lorentz model that hold whatever the implementation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training import lorentz as L

curvatures = st.floats(min_value=0.1, max_value=10.0)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def points(seed: int, n: int = 8, d: int = 16, scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype) * scale


@settings(max_examples=40, deadline=None)
@given(seed=seeds, c=curvatures)
def test_distance_is_zero_on_the_diagonal_symmetric_and_positive(seed, c):
    x = points(seed, scale=0.7)
    d = L.pairwise_dist(x, x, c)
    assert torch.allclose(d.diagonal(), torch.zeros(len(x), dtype=x.dtype), atol=1e-3)
    assert torch.allclose(d, d.T, atol=1e-9)
    off = d[~torch.eye(len(x), dtype=torch.bool)]
    assert bool((off > 0).all())


@settings(max_examples=40, deadline=None)
@given(seed=seeds, c=curvatures)
def test_triangle_inequality(seed, c):
    a, b, cc = points(seed, n=3 * 32).split(32)
    dab, dbc, dac = (L.elementwise_dist(u, v, c) for u, v in ((a, b), (b, cc), (a, cc)))
    assert bool((dac <= dab + dbc + 1e-6).all())


@settings(max_examples=40, deadline=None)
@given(seed=seeds, c=curvatures)
def test_exp_map_distance_and_log_map_inverse(seed, c):
    v = points(seed, scale=0.5)
    x = L.exp_map0(v, c)
    assert torch.allclose(L.dist0(x, c), v.norm(dim=-1), rtol=1e-6, atol=1e-7)
    assert torch.allclose(L.log_map0(x, c), v, rtol=1e-6, atol=1e-7)
    # dist0 agrees with the general distance to the zero vector
    zero = torch.zeros(1, v.shape[1], dtype=v.dtype)
    assert torch.allclose(L.pairwise_dist(zero, x, c)[0], L.dist0(x, c), atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, c=curvatures)
def test_points_lie_on_the_hyperboloid(seed, c):
    x = L.exp_map0(points(seed), c)
    assert torch.allclose(L.elementwise_inner(x, x, c), torch.full((len(x),), -1 / c, dtype=x.dtype), rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, c=curvatures, t=st.floats(min_value=0.05, max_value=3.0))
def test_move_to_dist0_keeps_direction(seed, c, t):
    x = L.exp_map0(points(seed), c)
    y = L.move_to_dist0(x, t, c)
    assert torch.allclose(L.dist0(y, c), torch.full((len(x),), t, dtype=x.dtype), rtol=1e-6)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos))


@pytest.mark.parametrize("c", [0.3, 1.0, 4.0])
def test_exterior_angle_on_the_ray_and_between(c):
    x = L.exp_map0(points(1, n=16, scale=0.6), c)
    direction = x / x.norm(dim=-1, keepdim=True)
    beyond = L.move_to_dist0(x, L.dist0(x, c) + 1.0, c)
    between = L.move_to_dist0(x, L.dist0(x, c) * 0.4, c)
    assert torch.allclose(L.oxy_angle(x, beyond, c), torch.zeros(16, dtype=x.dtype), atol=2e-2)
    assert torch.allclose(L.oxy_angle(x, between, c), torch.full((16,), math.pi, dtype=x.dtype), atol=2e-2)
    assert torch.allclose(beyond / beyond.norm(dim=-1, keepdim=True), direction)


def test_entailment_loss_zero_inside_cone_positive_outside():
    c = 1.0
    parent = L.exp_map0(points(2, n=16, scale=0.5), c)
    inside = L.move_to_dist0(parent, L.dist0(parent, c) + 0.5, c)
    outside = L.move_to_dist0(parent, L.dist0(parent, c) * 0.3, c)  # behind the apex: angle ~ pi
    assert float(L.entailment_loss(parent, inside, c)) < 1e-3
    assert float(L.entailment_loss(parent, outside, c)) > 1.0


def test_half_aperture_shrinks_away_from_origin():
    x = L.exp_map0(points(3, n=1, d=8, dtype=torch.float32), 1.0)
    near = L.move_to_dist0(x, 0.3, 1.0)
    far = L.move_to_dist0(x, 2.0, 1.0)
    assert float(L.half_aperture(near, 1.0)) > float(L.half_aperture(far, 1.0)) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_fp32(dtype):
    x = points(4, n=4, d=32, dtype=torch.float32, scale=0.1)
    ref = L.pairwise_dist(L.exp_map0(x, 1.0), L.exp_map0(x, 1.0), 1.0)
    out = L.pairwise_dist(L.exp_map0(x.to(dtype), 1.0), L.exp_map0(x.to(dtype), 1.0), 1.0)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=0.05)


def test_under_autocast_results_stay_fp32():
    x = points(5, n=4, d=32, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = L.pairwise_dist(L.exp_map0(x, 1.0), L.exp_map0(x, 1.0), 1.0)
    assert out.dtype == torch.float32
    assert torch.allclose(out.diagonal(), torch.zeros(4), atol=5e-3)


def test_exp_map_stays_finite_for_huge_vectors():
    v = torch.full((2, 8), 1e4)
    assert torch.isfinite(L.exp_map0(v, 1.0)).all()
