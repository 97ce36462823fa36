"""Concept unlearning: CLIPErase, Alignment Calibration (AC), hyperbolic AC (HAC) and three baselines.

Every batch pairs a retain set and a forget set (:mod:`training.data.forget`): ``s, v`` are the
embeddings of N retain captions and images, ``u, g`` those of N forget captions and images (the
forget pair of row i is ``(u_i, g_i)``; ``s_i`` and ``g_i`` are unrelated). ``sim`` is the
geometry's similarity: cosine for unit vectors, ``-d_L`` (the geodesic distance, MERU's) on the
hyperboloid; ``tau = 1 / exp(logit_scale)``, so :func:`logits` is ``sim / tau``. ``nce(a, b)`` is the
symmetric InfoNCE whose positives are the matching rows. Each method's terms, their order, named
weights and defaults are in :mod:`training.methods`; this module computes them.

- ``cliperase`` (CLIPErase, ACL 2025): ``lambda1 nce(s, v)`` (retention) ``+ lambda2 mean_i pair_sim(u_i, g_i)``
  (forgetting: matched forget pairs' similarity driven down) ``+ lambda3 [KL(p_o^img || p^img) + KL(p_o^txt || p^txt)]``
  (consistency: the frozen original model's in-batch similarity distributions on the retain pairs,
  image side and text side, kept). Weights 1, 3, 3 as the paper.
- ``ac`` (MUC's alignment calibration, the paper's equations, reference notes §2.2; one function per term)::

      L_AC = L_retain + epsilon (alpha L_neg + beta L_pos + gamma L_perf)
      L_retain = InfoNCE of the retain pairs against ALL 2N items of the other modality   retain_contrastive
      L_neg    = -(1/2N^2) sum_i sum_{j != i} [sim(g_i, u_j) + sim(g_j, u_i)] / tau         negative_calibration
      L_pos    = (1/N) sum_i sim(g_i, u_i) / tau                                            positive_calibration
      L_perf   = (1/2N) sum_i [log mean_j exp(sim(g_i, t'_j)/tau) + log mean_j exp(sim(x'_j, u_i)/tau)]  performance

  where ``t'``, ``x'`` run over all 2N captions and images of the batch.
- ``hac`` (HAC, CVPRW 2025, reference notes §2.3a): AC on a Lorentz model (``sim = -d_L``) plus
  ``omega_r L_r-ent + omega_f L_f-ent + lambda L_norm-reg`` with ``L_r-ent = mean relu(ext(s, v) - aper(s))``
  (:func:`retain_entailment`: retain images stay in their caption's cone, MERU's entailment loss),
  ``L_f-ent = mean relu(aper(u) - ext(u, g))`` (:func:`forget_entailment`: forget images pushed out of
  it) and ``L_norm-reg = (1/N) sum_i (|g_i| + |u_i|)`` (:func:`norm_regularisation`, the space
  components' Euclidean norms: monotone in the distance to the origin).
- ``form=ours`` (ac and hac; the reconstructions written before the papers' equations were read, kept
  for comparison): ``ac`` is ``nce(s, v)`` with the retain pairs alone + :func:`ours_negative_calibration`
  (an InfoNCE in which each forget image's positive is an unrelated retain caption and each forget
  caption's an unrelated retain image) + ``mean_i pair_sim(u_i, g_i)`` + ``uniformity`` of the forget
  items (Wang & Isola; option ``perf=none`` drops it); ``hac`` is ``nce(s, v)`` with ``-d`` logits +
  ``retain_entailment`` + :func:`ours_negative_calibration` + ``pair_sim`` (``exp(-d)``, or option
  ``positive=neg-dist``: ``-d``) + ``forget_entailment`` + ``norm`` on the forget embeddings' distance
  to the origin (option ``norm``: ``shrink`` ``mean d0``, default; ``grow`` ``mean exp(-d0)``; ``none``).
- Baselines: ``ga`` ascends ``nce(u, g)`` (gradient ascent on the forget pairs); ``graddiff`` adds
  descent on ``nce(s, v)``; ``kl`` adds, instead, the consistency KL to the original on the retain pairs.

Terms combine as a plain weighted sum (the papers' ``lambda1 L1 + lambda2 L2 + ...``). The encoder's
scalars (contrastive scale, curvature, alphas) stay as the source model has them. Unlearning keeps
the last epoch's weights: validation recall falls by design as the concept goes, so the best-recall
epoch would be the one that forgot least.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training import lorentz, methods
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


# ----------------------------------------------------------------------- AC and HAC, as the papers write them
def retain_contrastive(s: Tensor, v: Tensor, u: Tensor, g: Tensor, encoder) -> Tensor:
    """``L_retain``: InfoNCE of the retain pairs ``(v_i, s_i)`` whose negatives are all 2N captions ``[s; u]`` (image
    side) or all 2N images ``[v; g]`` (caption side); ``-(1/2N) sum_i`` of the two log-softmax terms."""
    return symmetric_cross_entropy(logits(v, torch.cat([s, u]), encoder), logits(s, torch.cat([v, g]), encoder))


def negative_calibration(u: Tensor, g: Tensor, encoder) -> Tensor:
    """``L_neg = -(1/2N^2) sum_i sum_{j != i} [sim(g_i, u_j) + sim(g_j, u_i)] / tau``: minimising it raises the
    similarity of mismatched forget pairs (no softmax). Both sums cover the same off-diagonal entries."""
    m = logits(g, u, encoder)  # (N, N): sim(g_i, u_j) / tau
    n = m.shape[0]
    return -(m.sum() - m.diagonal().sum()) / (n * n)


def positive_calibration(u: Tensor, g: Tensor, encoder) -> Tensor:
    """``L_pos = (1/N) sum_i sim(g_i, u_i) / tau``: minimising it lowers each matched forget pair's similarity."""
    return logits(g, u, encoder).diagonal().mean()


def performance(s: Tensor, v: Tensor, u: Tensor, g: Tensor, encoder) -> Tensor:
    """``L_perf = (1/2N) sum_i [log mean_j exp(sim(g_i, t'_j)/tau) + log mean_j exp(sim(x'_j, u_i)/tau)]``, ``t'`` the
    2N captions ``[s; u]``, ``x'`` the 2N images ``[v; g]``: each forget item's log-mean-exp similarity to the other
    modality."""
    captions, images = torch.cat([s, u]), torch.cat([v, g])
    log_2n = math.log(captions.shape[0])
    image_side = torch.logsumexp(logits(g, captions, encoder), dim=1) - log_2n
    caption_side = torch.logsumexp(logits(u, images, encoder), dim=1) - log_2n
    return 0.5 * (image_side.mean() + caption_side.mean())


def retain_entailment(s: Tensor, v: Tensor, curv: Tensor | float) -> Tensor:
    """``L_r-ent = mean relu(ext(v_i, s_i) - aper(s_i))``: each retain image stays in its caption's cone (MERU's loss)."""
    return lorentz.entailment_loss(s, v, curv)


def forget_entailment(u: Tensor, g: Tensor, curv: Tensor | float) -> Tensor:
    """``L_f-ent = mean relu(aper(u_i) - ext(g_i, u_i))``: each forget image is pushed out of its caption's cone."""
    return torch.relu(lorentz.half_aperture(u, curv) - lorentz.oxy_angle(u, g, curv)).mean()


def norm_regularisation(u: Tensor, g: Tensor) -> Tensor:
    """``L_norm-reg = (1/N) sum_i (|g_i| + |u_i|)``, the Euclidean norms of the forget embeddings' space components."""
    return (torch.linalg.vector_norm(g.float(), dim=-1) + torch.linalg.vector_norm(u.float(), dim=-1)).mean()


def ac_terms(s: Tensor, v: Tensor, u: Tensor, g: Tensor, encoder) -> list[Tensor]:
    """AC's four terms in :mod:`training.methods`' order: retain, negative, positive calibration, performance."""
    return [retain_contrastive(s, v, u, g, encoder), negative_calibration(u, g, encoder),
            positive_calibration(u, g, encoder), performance(s, v, u, g, encoder)]


# ---------------------------------------------------------------------------------- form=ours (our variants)
def ours_negative_calibration(s: Tensor, v: Tensor, u: Tensor, g: Tensor, encoder) -> Tensor:
    """form=ours: InfoNCE pulling each forget image toward an unrelated retain caption, and each forget caption toward
    an unrelated retain image (row i of the retain half is a random partner of forget pair i)."""
    return 0.5 * (nce(g, s, encoder) + nce(u, v, encoder))


def uniformity(x: Tensor) -> Tensor:
    """Wang & Isola's uniformity ``log mean_{i != j} exp(-2 |x_i - x_j|^2)`` of L2-normalised rows."""
    x = F.normalize(x.float(), dim=-1)
    sq = torch.cdist(x, x).pow(2)
    off = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.log(torch.exp(-2 * sq[off]).mean())


class UnlearningObjective(Objective):
    """What every unlearning method shares: a retain half and a forget half, a weighted sum, options.

    The terms, their default weights and the options are :mod:`training.methods`' (of the form the options choose);
    ``terms`` on the class is the first form's, on an instance the chosen form's.
    """

    uses_unsafe = True  # the "unsafe" half of each training quadruplet is the forget pair
    trained_scalars = ()
    optimizer = "adam"  # CLIPErase's; no weight decay on a short fine-tune
    keep_last = True
    geometry = "any"  # the source artifact's own (hac: lorentz only)
    needs_reference: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.terms = methods.method(cls.name).term_names

    def __init__(self, reference=None, *, weights: tuple[float, ...] | None = None,
                 params: Mapping[str, float] | None = None, options: Mapping[str, str] | None = None):
        super().__init__(gather_negatives=False)
        self.chosen = methods.check_options(self.name, options or {})
        self.spec = methods.spec(self.name, self.chosen)
        self.terms = self.spec.term_names
        self.weights = methods.term_weights(self.name, weights=weights, params=params, options=self.chosen)
        # the named weights, where they are known (given by name, or the defaults): provenance records them
        self.params = methods.resolved_params(self.name, params, self.chosen) if weights is None and self.spec.params \
            else None
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

    def _options(self) -> dict[str, str]:
        """The chosen options, with the form spelled out for a method that has several (a resumed run must agree)."""
        form = {"form": self.option("form")} if "form" in self.spec.option_values else {}
        return dict(sorted({**self.chosen, **form}.items()))

    def identity(self) -> dict[str, Any]:
        options = self._options()
        return {"options": options} if options else {}

    def provenance(self) -> dict[str, Any]:
        options = self._options()
        return {"weights": list(self.weights), **({"params": self.params} if self.params else {}),
                **({"options": options} if options else {})}

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
        return self.chosen.get(name, self.spec.option_values[name][0])


class CLIPEraseObjective(UnlearningObjective):
    name = "cliperase"
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

    def forward(self, emb: Embeddings, encoder) -> LossOutput:
        s, v, u, g = self.halves(emb)
        if self.option("form") == "paper":
            return self.combine(ac_terms(s, v, u, g, encoder))
        perf = uniformity(torch.cat([u, g])) if self.option("perf") == "uniformity" else s.new_zeros(())
        return self.combine([
            nce(s, v, encoder),
            ours_negative_calibration(s, v, u, g, encoder),
            pair_similarity(u, g, encoder),
            perf,
        ])


class HACObjective(UnlearningObjective):
    name = "hac"
    geometry = "lorentz"

    def forward(self, emb: Embeddings, encoder) -> LossOutput:
        s, v, u, g = self.halves(emb)
        curv = encoder.curv.exp()
        if self.option("form") == "paper":
            return self.combine([
                *ac_terms(s, v, u, g, encoder),
                retain_entailment(s, v, curv),
                forget_entailment(u, g, curv),
                norm_regularisation(u, g),
            ])
        d0 = lorentz.dist0(torch.cat([u, g]), curv)
        norm = {"shrink": d0.mean(), "grow": torch.exp(-d0).mean(), "none": d0.new_zeros(())}[self.option("norm")]
        return self.combine([
            nce(s, v, encoder),
            retain_entailment(s, v, curv),
            ours_negative_calibration(s, v, u, g, encoder),
            pair_similarity(u, g, encoder, positive=self.option("positive")),
            forget_entailment(u, g, curv),
            norm,
        ])


class GradientAscentObjective(UnlearningObjective):
    name = "ga"

    def forward(self, emb: Embeddings, encoder) -> LossOutput:
        _, _, u, g = self.halves(emb)
        value = nce(u, g, encoder)
        return LossOutput(-self.weights[0] * value, {"forget_contrastive": value.detach()})


class GradDiffObjective(UnlearningObjective):
    name = "graddiff"

    def forward(self, emb: Embeddings, encoder) -> LossOutput:
        s, v, u, g = self.halves(emb)
        retain, forget = nce(s, v, encoder), nce(u, g, encoder)
        loss = self.weights[0] * retain - self.weights[1] * forget
        return LossOutput(loss, {"retain_contrastive": retain.detach(), "forget_contrastive": forget.detach()})


class KLObjective(UnlearningObjective):
    name = "kl"
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
