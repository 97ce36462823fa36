"""HySAC: hyperbolic contrastive learning plus entailment cones that put safe content near the origin.

Four contrastive pairings treat both the matching and the cross (safe <-> unsafe) caption/image
pairs as positives, with logits ``-geodesic distance * exp(logit_scale)``:
``(T, I)``, ``(T*, I*)``, ``(T, I*)``, ``(T*, I)``. Three entailment losses order the space as
``T > I > T* > I*`` (parents nearer the origin): ``T entails I``, ``T* entails I*``, ``I entails T*``.
The seven terms are weighted ``[1, 1, 1, 1, eta, eta, eta]``, normalised to sum 1 and divided by 7,
as in the reference code; ``weights=`` replaces all seven.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from training import lorentz
from training.objectives.base import Embeddings, LossOutput, Objective, symmetric_cross_entropy, weighted_mean

TERMS = ("contrastive_TI", "contrastive_T*I*", "contrastive_TI*", "contrastive_T*I", "entail_TI", "entail_T*I*", "entail_IT*")


def hyperbolic_contrastive(
    text: Tensor, image: Tensor, text_all: Tensor, image_all: Tensor, curv: Tensor, scale: Tensor, offset: int = 0
) -> Tensor:
    """Symmetric InfoNCE with logits ``-d(a, b) * scale``.

    ``text, image (B, D)`` are this rank's rows; ``text_all, image_all (N, D)`` the candidates (the
    same rows, or every rank's); local row i's positive is candidate ``offset + i``.
    """
    logits_t = -lorentz.pairwise_dist(text, image_all, curv) * scale  # (B, N)
    logits_i = -lorentz.pairwise_dist(image, text_all, curv) * scale  # (B, N)
    return symmetric_cross_entropy(logits_t, logits_i, offset)


class HySACObjective(Objective):
    name = "hysac"
    geometry = "lorentz"
    uses_unsafe = True
    trained_scalars = ("logit_scale", "curv", "visual_alpha", "textual_alpha")
    terms = TERMS

    def __init__(
        self, *, eta: float = 1.0, weights: tuple[float, ...] | None = None, min_radius: float = lorentz.MIN_RADIUS,
        gather_negatives: bool = False,
    ):
        super().__init__(gather_negatives=gather_negatives)
        self.weights = tuple(float(w) for w in weights) if weights is not None else (1.0, 1.0, 1.0, 1.0, eta, eta, eta)
        if len(self.weights) != len(TERMS):
            raise ValueError(f"HySAC takes {len(TERMS)} weights, got {len(self.weights)}")
        self.eta = None if weights is not None else eta  # given weights replace eta's three
        self.min_radius = min_radius

    def provenance(self) -> dict[str, Any]:
        return {"eta": self.eta, "weights": list(self.weights)}

    def forward(self, emb: Embeddings, encoder) -> LossOutput:
        s, u, v, g = emb.s, emb.u, emb.v, emb.g
        if u is None or g is None:
            raise ValueError("HySAC needs the unsafe caption and image of every quadruplet")
        curv = encoder.curv.exp()
        scale = encoder.logit_scale.exp()
        (s_all, u_all, v_all, g_all), off = self.gather(s, u, v, g)
        k = self.min_radius
        values = [
            hyperbolic_contrastive(s, v, s_all, v_all, curv, scale, off),
            hyperbolic_contrastive(u, g, u_all, g_all, curv, scale, off),
            hyperbolic_contrastive(s, g, s_all, g_all, curv, scale, off),
            hyperbolic_contrastive(u, v, u_all, v_all, curv, scale, off),
            lorentz.entailment_loss(s, v, curv, min_radius=k),
            lorentz.entailment_loss(u, g, curv, min_radius=k),
            lorentz.entailment_loss(v, u, curv, min_radius=k),
        ]
        loss = weighted_mean(values, list(self.weights))
        return LossOutput(loss, dict(zip(TERMS, (t.detach() for t in values), strict=True)))
