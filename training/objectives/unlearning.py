"""Concept unlearning: CLIPErase, Alignment Calibration (AC), hyperbolic AC (HAC) and three baselines.

Every batch pairs a retain set and a forget set (:mod:`training.data.forget`): ``s, v`` are the
embeddings of B retain captions and images, ``u, g`` those of B forget captions and images (the
forget pair of row i is ``(u_i, g_i)``; ``s_i`` and ``g_i`` are unrelated). With ``sim`` the
geometry's similarity (cosine for unit vectors; ``-geodesic distance`` on the hyperboloid, which is
MERU's) and ``nce(a, b)`` the symmetric InfoNCE with logits ``exp(logit_scale) * sim`` whose
positives are the matching rows:

- ``cliperase`` (CLIPErase, ACL 2025): ``w1 * nce(s, v)`` (retention) ``+ w2 * mean_i pair_sim(u_i, g_i)``
  (forgetting: matched forget pairs' similarity driven down) ``+ w3 * [KL(p_o^img || p^img) + KL(p_o^txt || p^txt)]``
  (consistency: the frozen original model's in-batch similarity distributions on the retain pairs,
  image side and text side, kept). Weights 1, 3, 3 as the paper.
- ``ac`` (MUC's alignment calibration, here for CLIP [unverified: no CLIP code exists; reference
  notes §2.2]): ``w1 * nce(s, v) + w2 * L_neg + w3 * L_pos + w4 * L_perf`` where ``w2..w4`` are
  ``epsilon * (alpha, beta, gamma)``. ``L_neg``, negative calibration, is an InfoNCE in which each
  forget image's positive is an unrelated retain caption and each forget caption's an unrelated
  retain image (AC pairs forget samples with a random partner); ``L_pos``, positive calibration, is
  ``mean_i pair_sim(u_i, g_i)``; ``L_perf`` keeps the forget embeddings spread out (option
  ``perf``: ``uniformity``, Wang & Isola's ``log mean exp(-2 |x - y|^2)`` over the forget images and
  captions, default; or ``none``) [unverified: the paper's performance term is not public].
- ``hac`` (HAC, CVPRW 2025; **our reconstruction**, no authors' code exists, reference notes §2.3):
  on a Lorentz model, ``w1 * nce(s, v)`` with MERU's ``-d`` logits ``+ w2 * entail(s, v)`` (retain
  entailment, omega_r: each retain caption keeps entailing its image) ``+ w3 * L_neg + w4 * L_pos``
  (AC's calibrations with ``-d`` as the similarity) ``+ w5 * mean relu(aperture(u) - angle(u, g))``
  (forget entailment, omega_f: each forget image is pushed out of its caption's cone) ``+ w6 * norm``
  (lambda, on the forget embeddings' distance to the origin, option ``norm``: ``shrink``
  ``mean d0`` pulls them toward the generic region near the origin, default; ``grow``
  ``mean exp(-d0)`` pushes them outward; ``none``). ``pair_sim`` is ``exp(-d)`` (bounded, so driving it
  down cannot diverge) or, option ``positive=neg-dist``, ``-d``. These choices are ours: the paper
  names the parts (negative distance, entailment calibration, norm regularisation), not their form.
- Baselines: ``ga`` ascends ``nce(u, g)`` (gradient ascent on the forget pairs); ``graddiff`` adds
  descent on ``nce(s, v)``; ``kl`` adds, instead, the consistency KL to the original on the retain pairs.

Terms combine as a plain weighted sum (the papers' ``lambda1 L1 + lambda2 L2 + ...``). The encoder's
scalars (contrastive scale, curvature, alphas) stay as the source model has them. Unlearning keeps
the last epoch's weights: validation recall falls by design as the concept goes, so the best-recall
epoch would be the one that forgot least.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training import lorentz
from training.errors import InputError
from training.objectives.base import Batch, Embeddings, LossOutput, Objective, symmetric_cross_entropy


def logits(a: Tensor, b: Tensor, encoder) -> Tensor:
    """``(B, D), (N, D) -> (B, N)``: ``exp(logit_scale) * sim``, sim = cosine or ``-geodesic distance``."""
    scale = encoder.logit_scale.exp()
    if encoder.geometry == "lorentz":
        return -lorentz.pairwise_dist(a, b, encoder.curv.exp()) * scale
    return scale * a.float() @ b.float().T


def nce(a: Tensor, b: Tensor, encoder) -> Tensor:
    """Symmetric InfoNCE of matching rows of ``a (B, D)`` and ``b (B, D)`` (the local batch as negatives)."""
    return symmetric_cross_entropy(logits(a, b, encoder), logits(b, a, encoder))


def pair_similarity(a: Tensor, b: Tensor, encoder, *, positive: str = "exp-neg-dist") -> Tensor:
    """Mean similarity of matching rows: cosine, or on the hyperboloid ``exp(-d)`` (``positive="neg-dist"``: ``-d``)."""
    if encoder.geometry == "lorentz":
        d = lorentz.elementwise_dist(a, b, encoder.curv.exp())
        return (-d if positive == "neg-dist" else torch.exp(-d)).mean()
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean()


def consistency(s: Tensor, v: Tensor, s_ref: Tensor, v_ref: Tensor, encoder, reference) -> Tensor:
    """``KL(p_o^img || p^img) + KL(p_o^txt || p^txt)``: the in-batch similarity distributions of the retain
    images over captions and captions over images, original (frozen) vs current."""
    cur = logits(v, s, encoder)
    ref = logits(v_ref, s_ref, reference).detach()
    kl_img = F.kl_div(F.log_softmax(cur, dim=1), F.log_softmax(ref, dim=1), log_target=True, reduction="batchmean")
    kl_txt = F.kl_div(F.log_softmax(cur.T, dim=1), F.log_softmax(ref.T, dim=1), log_target=True, reduction="batchmean")
    return kl_img + kl_txt


def negative_calibration(s: Tensor, v: Tensor, u: Tensor, g: Tensor, encoder) -> Tensor:
    """InfoNCE pulling each forget image toward an unrelated retain caption, and each forget caption toward an
    unrelated retain image (row i of the retain half is a random partner of forget pair i)."""
    return 0.5 * (nce(g, s, encoder) + nce(u, v, encoder))


def uniformity(x: Tensor) -> Tensor:
    """Wang & Isola's uniformity ``log mean_{i != j} exp(-2 |x_i - x_j|^2)`` of L2-normalised rows."""
    x = F.normalize(x.float(), dim=-1)
    sq = torch.cdist(x, x).pow(2)
    off = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.log(torch.exp(-2 * sq[off]).mean())


class UnlearningObjective(Objective):
    """What every unlearning method shares: a retain half and a forget half, a weighted sum, options."""

    uses_unsafe = True  # the "unsafe" half of each training quadruplet is the forget pair
    trained_scalars = ()
    optimizer = "adam"  # CLIPErase's; no weight decay on a short fine-tune
    keep_last = True
    geometry = "any"  # the source artifact's own (hac: lorentz only)
    default_weights: ClassVar[tuple[float, ...]] = ()
    options: ClassVar[dict[str, tuple[str, ...]]] = {}  # option -> allowed values, the first the default
    needs_reference: ClassVar[bool] = False

    def __init__(self, reference=None, *, weights: tuple[float, ...] | None = None, options: dict[str, str] | None = None):
        super().__init__(gather_negatives=False)
        self.weights = tuple(float(w) for w in (weights or self.default_weights or (1.0,) * len(self.terms)))
        if len(self.weights) != len(self.terms):
            raise ValueError(f"{self.name} takes {len(self.terms)} weights, got {len(self.weights)}")
        self.chosen = check_options(self.name, self.options, options or {})
        self.ref = None
        if self.needs_reference:
            if reference is None:
                raise ValueError(f"{self.name} needs the encoder before training as its frozen reference")
            self.ref = copy.deepcopy(reference).eval()
            for p in self.ref.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ref is not None:
            self.ref.eval()
        return self

    def frozen(self) -> dict[str, nn.Module]:
        return {"reference": self.ref} if self.ref is not None else {}

    def identity(self) -> dict[str, Any]:
        return {"options": dict(self.chosen)} if self.chosen else {}

    def provenance(self) -> dict[str, Any]:
        return {"weights": list(self.weights), **({"options": dict(self.chosen)} if self.chosen else {})}

    @torch.no_grad()
    def reference(self, batch: Batch) -> tuple[Tensor, Tensor] | None:
        if self.ref is None:
            return None
        return self.ref.embed_tokens(batch.safe_tokens), self.ref.embed_pixels(batch.safe_pixels)

    def combine(self, values: list[Tensor]) -> LossOutput:
        loss = sum(w * t for w, t in zip(self.weights, values, strict=True))
        return LossOutput(loss, dict(zip(self.terms, (t.detach() for t in values), strict=True)))

    @staticmethod
    def halves(emb: Embeddings) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if emb.u is None or emb.g is None:
            raise ValueError("unlearning needs the forget pair (the unsafe half) of every training quadruplet")
        return emb.s, emb.v, emb.u, emb.g

    def option(self, name: str) -> str:
        return self.chosen.get(name, self.options[name][0])


def check_options(method: str, allowed: dict[str, tuple[str, ...]], given: dict[str, str]) -> dict[str, str]:
    """``given`` checked against ``method``'s ``allowed`` options; an :class:`InputError` names the allowed ones."""
    for key, value in given.items():
        if key not in allowed:
            known = "; ".join(f"{k}={'|'.join(v)}" for k, v in allowed.items()) or "none"
            raise InputError(f"--objective-option {key}={value}: {method} has no option {key!r} (its options: {known})")
        if value not in allowed[key]:
            raise InputError(f"--objective-option {key}={value}: use one of {', '.join(allowed[key])}")
    return dict(sorted(given.items()))


class CLIPEraseObjective(UnlearningObjective):
    name = "cliperase"
    terms = ("retain_contrastive", "forget_similarity", "consistency_KL")
    default_weights = (1.0, 3.0, 3.0)
    needs_reference = True

    def forward(self, emb: Embeddings, encoder) -> LossOutput:
        s, v, u, g = self.halves(emb)
        assert emb.s_ref is not None and emb.v_ref is not None
        return self.combine([
            nce(s, v, encoder),
            pair_similarity(u, g, encoder),
            consistency(s, v, emb.s_ref, emb.v_ref, encoder, self.ref),
        ])


class ACObjective(UnlearningObjective):
    name = "ac"
    terms = ("retain_contrastive", "negative_calibration", "positive_calibration", "performance")
    default_weights = (1.0, 1.0, 1.0, 0.1)  # 1, epsilon * (alpha, beta, gamma) with epsilon = alpha = beta = 1, gamma 0.1
    options = {"perf": ("uniformity", "none")}

    def forward(self, emb: Embeddings, encoder) -> LossOutput:
        s, v, u, g = self.halves(emb)
        perf = uniformity(torch.cat([u, g])) if self.option("perf") == "uniformity" else s.new_zeros(())
        return self.combine([
            nce(s, v, encoder),
            negative_calibration(s, v, u, g, encoder),
            pair_similarity(u, g, encoder),
            perf,
        ])


class HACObjective(UnlearningObjective):
    name = "hac"
    geometry = "lorentz"
    terms = ("retain_contrastive", "retain_entailment", "negative_calibration", "positive_calibration",
             "forget_entailment", "norm")
    default_weights = (1.0, 1.0, 1.0, 1.0, 1.0, 0.1)  # 1, omega_r, alpha, beta, omega_f, lambda
    options = {"positive": ("exp-neg-dist", "neg-dist"), "norm": ("shrink", "grow", "none")}

    def forward(self, emb: Embeddings, encoder) -> LossOutput:
        s, v, u, g = self.halves(emb)
        curv = encoder.curv.exp()
        out_of_cone = torch.relu(lorentz.half_aperture(u, curv) - lorentz.oxy_angle(u, g, curv)).mean()
        d0 = lorentz.dist0(torch.cat([u, g]), curv)
        norm = {"shrink": d0.mean(), "grow": torch.exp(-d0).mean(), "none": d0.new_zeros(())}[self.option("norm")]
        return self.combine([
            nce(s, v, encoder),
            lorentz.entailment_loss(s, v, curv),
            negative_calibration(s, v, u, g, encoder),
            pair_similarity(u, g, encoder, positive=self.option("positive")),
            out_of_cone,
            norm,
        ])


class GradientAscentObjective(UnlearningObjective):
    name = "ga"
    terms = ("forget_contrastive",)

    def forward(self, emb: Embeddings, encoder) -> LossOutput:
        _, _, u, g = self.halves(emb)
        value = nce(u, g, encoder)
        return LossOutput(-self.weights[0] * value, {"forget_contrastive": value.detach()})


class GradDiffObjective(UnlearningObjective):
    name = "graddiff"
    terms = ("retain_contrastive", "forget_contrastive")

    def forward(self, emb: Embeddings, encoder) -> LossOutput:
        s, v, u, g = self.halves(emb)
        retain, forget = nce(s, v, encoder), nce(u, g, encoder)
        loss = self.weights[0] * retain - self.weights[1] * forget
        return LossOutput(loss, {"retain_contrastive": retain.detach(), "forget_contrastive": forget.detach()})


class KLObjective(UnlearningObjective):
    name = "kl"
    terms = ("forget_contrastive", "retain_KL")
    needs_reference = True

    def forward(self, emb: Embeddings, encoder) -> LossOutput:
        s, v, u, g = self.halves(emb)
        assert emb.s_ref is not None and emb.v_ref is not None
        forget = nce(u, g, encoder)
        kl = consistency(s, v, emb.s_ref, emb.v_ref, encoder, self.ref)
        loss = -self.weights[0] * forget + self.weights[1] * kl
        return LossOutput(loss, {"forget_contrastive": forget.detach(), "retain_KL": kl.detach()})


UNLEARNING: tuple[type[UnlearningObjective], ...] = (
    CLIPEraseObjective, ACObjective, HACObjective, GradientAscentObjective, GradDiffObjective, KLObjective,
)
