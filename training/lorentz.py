"""Geometry of the Lorentz model of hyperbolic space (MERU / HySAC).

The hyperboloid with curvature ``-c`` (``c > 0``) is ``{z in R^(D+1): <z, z>_L = -1/c, z_0 > 0}``.
We store only the *space components* ``x in R^D`` of a point; its *time component* is
``t(x) = sqrt(1/c + |x|^2)``. The origin (root) is ``x = 0``. Tangent vectors at the origin are
plain vectors ``v in R^D``; ``exp_map0`` lifts them onto the hyperboloid and ``log_map0`` undoes it.

Every function is pure, accepts broadcastable leading dimensions unless shapes say otherwise,
and computes in float32 or wider: half-precision inputs are upcast and autocast is disabled,
because acosh/asinh/sinh lose all accuracy in bf16. Numerical guards are keyword arguments.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Tensor])

#: Minimum radius ``K`` of entailment cones (MERU, HySAC).
MIN_RADIUS = 0.1


def _full_precision(fn: F) -> F:
    """Run ``fn`` with autocast off and every half-precision tensor argument upcast to fp32."""

    def up(a):
        if isinstance(a, Tensor) and a.dtype in (torch.float16, torch.bfloat16):
            return a.float()
        return a

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(up(a) for a in args)
        kwargs = {k: up(v) for k, v in kwargs.items()}
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _c(curv: float | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(curv, dtype=like.dtype, device=like.device)


@_full_precision
def time_component(x: Tensor, curv: float | Tensor) -> Tensor:
    """Time component ``t(x) = sqrt(1/c + |x|^2)``. ``(..., D) -> (...)``."""
    c = _c(curv, x)
    return torch.sqrt(1.0 / c + (x * x).sum(-1))


@_full_precision
def pairwise_inner(x: Tensor, y: Tensor, curv: float | Tensor) -> Tensor:
    """Lorentz inner product of every row of ``x (B1, D)`` with every row of ``y (B2, D)``: ``(B1, B2)``.

    ``<x, y>_L = x . y - t(x) t(y)``; it is ``-1/c`` on the diagonal of ``x`` with itself and
    decreases as points move apart, so larger means nearer.
    """
    xt = time_component(x, curv)
    yt = time_component(y, curv)
    return x @ y.transpose(-1, -2) - xt.unsqueeze(-1) * yt.unsqueeze(-2)


@_full_precision
def elementwise_inner(x: Tensor, y: Tensor, curv: float | Tensor) -> Tensor:
    """Lorentz inner product of matching rows: ``(..., D), (..., D) -> (...)``."""
    return (x * y).sum(-1) - time_component(x, curv) * time_component(y, curv)


def _acosh_dist(inner: Tensor, c: Tensor, eps: float) -> Tensor:
    return torch.acosh(torch.clamp(-c * inner, min=1.0 + eps)) / torch.sqrt(c)


@_full_precision
def pairwise_dist(x: Tensor, y: Tensor, curv: float | Tensor, *, eps: float = 1e-8) -> Tensor:
    """Geodesic distance between every row of ``x (B1, D)`` and ``y (B2, D)``: ``(B1, B2)``.

    ``d = acosh(-c <x, y>_L) / sqrt(c)``, with the acosh argument clamped to ``>= 1 + eps``. The
    argument is computed from differences, ``-c <x, y>_L = 1 + c/2 |x - y|_L^2`` with
    ``|x - y|_L^2 = |xs - ys|^2 - (t(x) - t(y))^2`` and ``t(x) - t(y) = (|xs|^2 - |ys|^2) / (t(x) + t(y))``,
    so its rounding error scales with the space components, not with ``t^2``: far from the origin
    (``t`` in the hundreds) the plain inner product loses small distances to fp32 cancellation.
    """
    c = _c(curv, x)
    nx, ny = (x * x).sum(-1), (y * y).sum(-1)
    tx, ty = torch.sqrt(1.0 / c + nx), torch.sqrt(1.0 / c + ny)
    space = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").square()  # exact differences, no cancellation
    dt = (nx.unsqueeze(-1) - ny.unsqueeze(-2)) / (tx.unsqueeze(-1) + ty.unsqueeze(-2))
    arg = 1.0 + c / 2 * (space - dt * dt)
    return torch.acosh(torch.clamp(arg, min=1.0 + eps)) / torch.sqrt(c)


@_full_precision
def elementwise_dist(x: Tensor, y: Tensor, curv: float | Tensor, *, eps: float = 1e-8) -> Tensor:
    """Geodesic distance between matching rows: ``(..., D), (..., D) -> (...)``."""
    return _acosh_dist(elementwise_inner(x, y, curv), _c(curv, x), eps)


@_full_precision
def dist0(x: Tensor, curv: float | Tensor) -> Tensor:
    """Geodesic distance from the origin, ``asinh(sqrt(c) |x|) / sqrt(c)``: ``(..., D) -> (...)``.

    Exact (no acosh clamp), so it is accurate near the origin too.
    """
    sc = torch.sqrt(_c(curv, x))
    return torch.asinh(sc * torch.linalg.vector_norm(x, dim=-1)) / sc


@_full_precision
def exp_map0(v: Tensor, curv: float | Tensor, *, eps: float = 1e-8) -> Tensor:
    """Exponential map at the origin: tangent vector ``v (..., D)`` -> space components ``(..., D)``.

    ``x = sinh(sqrt(c) |v|) v / (sqrt(c) |v|)``. The sinh input is capped at ``asinh(2^15)`` so the
    result stays finite in fp32; ``dist0(exp_map0(v)) == |v|`` below that cap.
    """
    c = _c(curv, v)
    r = torch.sqrt(c) * torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    r_capped = torch.clamp(r, min=eps, max=math.asinh(2.0**15))
    return torch.sinh(r_capped) * v / torch.clamp(r, min=eps)


@_full_precision
def log_map0(x: Tensor, curv: float | Tensor, *, eps: float = 1e-8) -> Tensor:
    """Logarithmic map at the origin, the inverse of ``exp_map0``: ``(..., D) -> (..., D)``.

    The returned tangent vector points along ``x`` and has norm ``dist0(x)``.
    """
    sc = torch.sqrt(_c(curv, x))
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.asinh(sc * norm) / sc * x / torch.clamp(norm, min=eps)


@_full_precision
def move_to_dist0(x: Tensor, target: Tensor | float, curv: float | Tensor, *, eps: float = 1e-8) -> Tensor:
    """Slide each point along its geodesic through the origin to distance ``target`` from it.

    ``x (..., D)``, ``target`` broadcastable to ``(...)``; the direction of ``x`` is kept.
    """
    c = _c(curv, x)
    sc = torch.sqrt(c)
    target = torch.as_tensor(target, dtype=x.dtype, device=x.device)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    new_norm = torch.sinh(sc * target).unsqueeze(-1) / sc
    return x * new_norm / torch.clamp(norm, min=eps)


@_full_precision
def half_aperture(x: Tensor, curv: float | Tensor, *, min_radius: float = MIN_RADIUS, eps: float = 1e-5) -> Tensor:
    """Half-aperture of the entailment cone rooted at ``x``: ``(..., D) -> (...)``, in ``(0, pi/2)``.

    ``asin(2K / (sqrt(c) |x|))``: points near the origin (generic concepts) get wide cones.
    """
    sc = torch.sqrt(_c(curv, x))
    ratio = 2 * min_radius / (sc * torch.linalg.vector_norm(x, dim=-1) + eps)
    return torch.asin(torch.clamp(ratio, min=-1 + eps, max=1 - eps))


@_full_precision
def oxy_angle(x: Tensor, y: Tensor, curv: float | Tensor, *, eps: float = 1e-5) -> Tensor:
    """Exterior angle at ``x`` of the hyperbolic triangle origin-``x``-``y``, for matching rows.

    ``(..., D), (..., D) -> (...)`` in ``[0, pi]``: ~0 when ``y`` lies on the ray from the origin
    through ``x`` beyond ``x``; ~pi when ``y`` lies between the origin and ``x``.
    """
    c = _c(curv, x)
    xt = time_component(x, c)
    yt = time_component(y, c)
    s = c * elementwise_inner(x, y, c)
    numer = yt + s * xt
    denom = torch.linalg.vector_norm(x, dim=-1) * torch.sqrt(torch.clamp(s * s - 1, min=eps))
    return torch.acos(torch.clamp(numer / (denom + eps), min=-1 + eps, max=1 - eps))


@_full_precision
def entailment_loss(
    parent: Tensor, child: Tensor, curv: float | Tensor, *, min_radius: float = MIN_RADIUS, aperture_scale: float = 1.0
) -> Tensor:
    """Mean violation of "``parent`` entails ``child``" over matching rows: a scalar >= 0.

    ``mean(relu(oxy_angle(parent, child) - aperture_scale * half_aperture(parent)))``: zero when each
    child lies inside its parent's cone.
    """
    angle = oxy_angle(parent, child, curv)
    aperture = half_aperture(parent, curv, min_radius=min_radius)
    return torch.relu(angle - aperture_scale * aperture).mean()
