"""Every training and unlearning method as data: its geometry, loss terms, named weights and options.

The one list the objectives (:mod:`training.objectives`), the CLI, the API's schemas and the jobs
read; it imports nothing heavy, so the CLI's ``--help`` and the service's request checks stay
torch-free.

A *forget* method's loss is a weighted sum of its ``terms``. Each term's weight is the product of
named parameters (``Term.factors``): AC's negative calibration weighs ``epsilon * alpha``, as
``L_AC = L_retain + epsilon (alpha L_neg + beta L_pos + gamma L_perf)`` writes it (reference notes
``safeclip_unlearning.md`` §2.2, §2.3a). A caller gives either the named parameters
(``alpha=0.75,beta=0.5``), or one weight per term in the order of ``terms`` (the form the other
methods take); :func:`term_weights` checks both and returns the per-term weights.

``ties`` are parameters the paper keeps equal (AC's and HAC's ``alpha = gamma``): giving them
different values is refused unless the option ``alpha_gamma=untied`` says it is meant.

A method may have several *forms*, chosen with the option ``form``: AC and HAC are the papers'
equations by default (``form=paper``) and this project's earlier reconstruction with ``form=ours``
(listed in ``Method.ours``). Each form other than the first is a :class:`Method` of its own in
``Method.forms`` (its terms, named weights, options); :func:`spec` picks the one the options choose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from training.errors import InputError


@dataclass(frozen=True)
class Term:
    name: str
    factors: tuple[str, ...] = ()  # the named parameters whose product weighs this term (none: weight 1)
    sign: float = 1.0  # -1: the term is ascended (gradient ascent on a contrastive loss)


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "train": trains or fine-tunes an encoder; "forget": unlearns concepts from an artifact
    geometry: str  # "lorentz", "euclidean", "any" (a train method's own choice) or "source" (the artifact's own)
    summary: str
    terms: tuple[Term, ...]
    params: tuple[tuple[str, float], ...] = ()  # named weights with their defaults, in the order they are documented
    options: tuple[tuple[str, tuple[str, ...]], ...] = ()  # option -> allowed values, the first the default
    ties: tuple[tuple[str, str], ...] = ()  # parameters kept equal unless the option alpha_gamma=untied
    ours: tuple[str, ...] = ()  # option values that are this project's variants, not the paper's
    defaults_note: str = ""
    forms: tuple[tuple[str, "Method"], ...] = ()  # form -> its spec, for the values of option "form" after the first

    @property
    def form_specs(self) -> dict[str, "Method"]:
        """Every form's spec, the first (this one) included; empty for a method with one form."""
        if "form" not in self.option_values:
            return {}
        return {self.option_values["form"][0]: self, **dict(self.forms)}

    @property
    def term_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.terms)

    @property
    def defaults(self) -> dict[str, float]:
        return dict(self.params)

    @property
    def option_values(self) -> dict[str, tuple[str, ...]]:
        return dict(self.options)

    def default_weights(self) -> tuple[float, ...]:
        return tuple(_weight(t, self.defaults) for t in self.terms)


def _weight(term: Term, params: Mapping[str, float]) -> float:
    w = 1.0
    for f in term.factors:
        w *= params[f]
    return w


_RETAIN = Term("retain_contrastive")
_AC_TERMS = (
    _RETAIN,
    Term("negative_calibration", ("epsilon", "alpha")),
    Term("positive_calibration", ("epsilon", "beta")),
    Term("performance", ("epsilon", "gamma")),
)
_TIE = ("alpha_gamma", ("tied", "untied"))
_FORM = ("form", ("paper", "ours"))

# form=ours: the reconstructions written before the papers' equations were read (objectives/unlearning.py says what
# each term computes there); their terms share the papers' names but not their formulas
_AC_OURS = Method(
    "ac", "forget", "source", "alignment calibration, our reconstruction (form=ours): retain InfoNCE, negative "
    "calibration towards unrelated retain items, matched forget similarity down, uniformity of the forget items",
    _AC_TERMS, params=(("epsilon", 1.0), ("alpha", 1.0), ("beta", 1.0), ("gamma", 0.1)),
    options=(_FORM, ("perf", ("uniformity", "none"))), ours=("ours",),
    defaults_note="alpha = beta 1, gamma 0.1, epsilon 1: ours, not the paper's")
_HAC_OURS = Method(
    "hac", "forget", "lorentz", "hyperbolic alignment calibration, our reconstruction (form=ours): retain InfoNCE "
    "and entailment, AC's calibrations with -d, forget images out of their captions' cones, a norm term",
    (_RETAIN, Term("retain_entailment", ("omega_r",)), Term("negative_calibration", ("alpha",)),
     Term("positive_calibration", ("beta",)), Term("forget_entailment", ("omega_f",)), Term("norm", ("lambda",))),
    params=(("omega_r", 1.0), ("alpha", 1.0), ("beta", 1.0), ("omega_f", 1.0), ("lambda", 0.1)),
    options=(_FORM, ("positive", ("exp-neg-dist", "neg-dist")), ("norm", ("shrink", "grow", "none"))), ours=("ours",),
    defaults_note="omega_r, alpha, beta, omega_f 1, lambda 0.1: ours, not the paper's")

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("hysac", "train", "lorentz", "HySAC: hyperbolic safety-aware CLIP (entailment cones, traversal)",
           tuple(Term(n) for n in ("contrastive_TI", "contrastive_T*I*", "contrastive_TI*", "contrastive_T*I",
                                   "entail_TI", "entail_T*I*", "entail_IT*"))),
    Method("safeclip", "train", "euclidean", "Safe-CLIP: redirect unsafe embeddings onto safe ones",
           tuple(Term(n) for n in ("cd_S_Sref", "cd_U_Sref", "cd_V_Vref", "cd_G_Vref", "nce_S_Vref", "nce_U_Vref",
                                   "nce_Sref_V", "nce_Sref_G"))),
    Method("clip", "train", "euclidean", "plain CLIP contrastive fine-tuning (the baseline; with --forget, the "
           "retrain-without oracle)", (Term("contrastive"),)),
    Method("cliperase", "forget", "source", "CLIPErase (ACL 2025): forgetting, retention and consistency modules",
           (Term("retain_contrastive", ("lambda1",)), Term("forget_similarity", ("lambda2",)),
            Term("consistency_KL", ("lambda3",))),
           params=(("lambda1", 1.0), ("lambda2", 3.0), ("lambda3", 3.0)),
           defaults_note="lambda1 = 1, lambda2 = lambda3 = 3, as the paper"),
    Method("ac", "forget", "source", "alignment calibration (MUC, TMLR 2025), as §2.2 of the reference notes",
           _AC_TERMS, params=(("epsilon", 0.03), ("alpha", 0.75), ("beta", 0.5), ("gamma", 0.75)),
           options=(_FORM, _TIE), ties=(("alpha", "gamma"),), ours=("ours",), forms=(("ours", _AC_OURS),),
           defaults_note="alpha = gamma 0.75, beta 0.5: the paper's best row; epsilon 0.03, ours (the notes give no "
                         "value; at epsilon 1 and 0.1 the demo base lost 34 and 12 points of r_acc, at 0.03 5, all "
                         "forgetting graffiti fully: seed 0, benchmarks/RESULTS.md)"),
    Method("hac", "forget", "lorentz", "hyperbolic alignment calibration (CVPRW 2025) on a Lorentz model, "
           "as §2.3a of the reference notes (lambda > 0: HAC-reg)",
           (*_AC_TERMS, Term("retain_entailment", ("omega_r",)), Term("forget_entailment", ("omega_f",)),
            Term("norm_regularisation", ("lambda",))),
           params=(("epsilon", 0.1), ("alpha", 0.5), ("beta", 0.5), ("gamma", 0.5), ("omega_r", 1.0),
                   ("omega_f", 1.0), ("lambda", 0.0)),
           options=(_FORM, _TIE), ties=(("alpha", "gamma"),), ours=("ours",), forms=(("ours", _HAC_OURS),),
           defaults_note="alpha = gamma 0.5, beta 0.5: the paper's best row; epsilon 0.1, omega_r, omega_f 1 and "
                         "lambda 0 (HAC; lambda > 0 is HAC-reg), ours: the notes give no values (at epsilon 1 the "
                         "demo HySAC model lost 20 points of r_acc and nearly all retrieval, at 0.1 6.5: seed 0)"),
    Method("ga", "forget", "source", "gradient ascent on the forget pairs' contrastive loss",
           (Term("forget_contrastive", ("ascent",), sign=-1.0),), params=(("ascent", 1.0),)),
    Method("graddiff", "forget", "source", "gradient difference: ascent on the forget pairs, descent on the retain pairs",
           (Term("retain_contrastive", ("retain",)), Term("forget_contrastive", ("ascent",), sign=-1.0)),
           params=(("retain", 1.0), ("ascent", 1.0))),
    Method("kl", "forget", "source", "ascent on the forget pairs, KL to the original on the retain pairs",
           (Term("forget_contrastive", ("ascent",), sign=-1.0), Term("retain_KL", ("consistency",))),
           params=(("ascent", 1.0), ("consistency", 1.0))),
)}

FORGETTING: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.kind == "forget")
#: The closed-form eraser (training/erasure.py): no loss and no training, so not a Method; ``train --method erase``
#: fits it on --model's features, and ``--then-erase`` after any forget method
ERASE = "erase"
#: what a forget request (the API's ``method``) may name: the unlearning methods and the eraser alone
FORGET_REQUESTS: tuple[str, ...] = (*FORGETTING, ERASE)
TRAINING: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.kind == "train")


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"unknown method {name!r}; use one of {', '.join(METHODS)}") from None


def spec(name: str, options: Mapping[str, str] | None = None) -> Method:
    """The method as ``options`` choose it: the spec of its ``form`` (the first form without the option).

    An unknown form is an :class:`InputError`; the other options are not checked here (:func:`check_options`).
    """
    m = method(name)
    forms = m.form_specs
    chosen = (options or {}).get("form")
    if chosen is None or not forms:
        return m
    if chosen not in forms:
        raise InputError(f"option form={chosen}: use one of {', '.join(forms)}")
    return forms[chosen]


def check_options(name: str, given: Mapping[str, str]) -> dict[str, str]:
    """``given`` checked against the options of the method's chosen form (an :class:`InputError` names the allowed
    ones, or the form an option belongs to), sorted."""
    allowed = spec(name, given).option_values
    for key, value in given.items():
        if key not in allowed:
            owner = next((f for f, s in method(name).form_specs.items() if key in s.option_values), None)
            if owner is not None:
                raise InputError(f"option {key}={value} belongs to {name}'s form={owner}"
                                 + (" (ours, not the paper's)" if owner in method(name).ours else "")
                                 + f"; add the option form={owner}, or drop {key}")
            known = "; ".join(f"{k}={'|'.join(v)}" for k, v in allowed.items()) or "none"
            raise InputError(f"option {key}={value}: {name} has no option {key!r} (its options: {known})")
        if value not in allowed[key]:
            raise InputError(f"option {key}={value}: use one of {', '.join(allowed[key])}")
    return dict(sorted(given.items()))


def term_weights(name: str, *, weights: Sequence[float] | None = None, params: Mapping[str, float] | None = None,
                 options: Mapping[str, str] | None = None) -> tuple[float, ...]:
    """The per-term weights of a forget method, from positional ``weights`` (one per term) or named ``params``
    (the others at their defaults), checked: non-negative finite numbers, names the method has, ties kept.
    The terms, names and defaults are those of the form ``options`` choose (:func:`spec`).

    Neither given: the defaults. Both: an :class:`InputError`.
    """
    if weights is not None and params is not None:
        raise InputError("give the weights by name (alpha=0.75,beta=0.5) or one per term, not both")
    chosen = check_options(name, options or {})
    m = spec(name, chosen)
    if params is not None:
        unknown = sorted(set(params) - set(m.defaults))
        if unknown:
            raise InputError(f"{name} has no weight {', '.join(map(repr, unknown))}; its weights: "
                             f"{_describe(m)}")
        values = {**m.defaults, **{k: float(v) for k, v in params.items()}}
        bad = {k: v for k, v in values.items() if not math.isfinite(v) or v < 0}
        if bad:
            raise InputError(f"{name}'s weights must be non-negative finite numbers; got "
                             f"{', '.join(f'{k}={v:g}' for k, v in bad.items())}")
        _check_ties(m, values, chosen)
        out = tuple(_weight(t, values) for t in m.terms)
    elif weights is not None:
        out = tuple(float(w) for w in weights)
        if len(out) != len(m.terms) or any(not math.isfinite(w) or w < 0 for w in out) or not sum(out):
            raise InputError(
                f"{name} takes {len(m.terms)} non-negative weights, not all zero, one per loss term in the order "
                f"{' '.join(m.term_names)}; got {','.join(f'{w:g}' for w in out)}. Its defaults: "
                f"{','.join(f'{w:g}' for w in m.default_weights())}" + (f" (or by name: {_describe(m)})" if m.params else ""))
        if m.ties and chosen.get("alpha_gamma", "tied") == "tied":
            per_term = dict(zip(m.term_names, out, strict=True))
            if not math.isclose(per_term["negative_calibration"], per_term["performance"], rel_tol=1e-9, abs_tol=1e-12):
                raise InputError(f"{name} keeps alpha = gamma, as the paper does: the negative_calibration and "
                                 f"performance weights differ ({per_term['negative_calibration']:g} vs "
                                 f"{per_term['performance']:g}); make them equal, or add the option alpha_gamma=untied")
    else:
        out = m.default_weights()
    if not sum(out):
        raise InputError(f"{name}'s weights are all zero: nothing would be trained; give at least one positive weight")
    return out


def _check_ties(m: Method, values: Mapping[str, float], options: Mapping[str, str]) -> None:
    if options.get("alpha_gamma", "tied") != "tied":
        return
    for a, b in m.ties:
        if not math.isclose(values[a], values[b], rel_tol=1e-9, abs_tol=1e-12):
            raise InputError(f"{m.name} keeps {a} = {b}, as the paper does; got {a}={values[a]:g}, {b}={values[b]:g}. "
                             f"Make them equal, or add the option alpha_gamma=untied")


def _describe(m: Method) -> str:
    return ", ".join(f"{k} (default {v:g})" for k, v in m.params)


def parse_weights(text: str) -> tuple[tuple[float, ...] | None, dict[str, float] | None]:
    """``"0.1,0.2"`` -> positional weights; ``"alpha=0.5,beta=0.25"`` -> named ones; a mix is an :class:`InputError`."""
    items = [p.strip() for p in text.split(",") if p.strip()]
    named = [p for p in items if "=" in p]
    if not items:
        raise InputError("--weights is empty; give numbers (0.1,0.2) or named weights (alpha=0.5,beta=0.25)")
    if named and len(named) != len(items):
        raise InputError(f"--weights takes either numbers or NAME=VALUE pairs, not a mix; got {text!r}")
    try:
        if named:
            out: dict[str, float] = {}
            for p in items:
                key, _, value = p.partition("=")
                if key.strip() in out:
                    raise InputError(f"--weights names {key.strip()!r} twice")
                out[key.strip()] = float(value)
            return None, out
        return tuple(float(p) for p in items), None
    except ValueError:
        raise InputError(f"--weights takes comma-separated numbers (0.1,0.2) or NAME=VALUE pairs (alpha=0.5); "
                         f"got {text!r}") from None


def resolved_params(name: str, params: Mapping[str, float] | None = None,
                    options: Mapping[str, str] | None = None) -> dict[str, float]:
    """Every named weight of the chosen form: ``params`` over the defaults (checked by :func:`term_weights` first)."""
    return {**spec(name, options).defaults, **{k: float(v) for k, v in (params or {}).items()}}


def describe(name: str) -> str:
    """One line per form: the terms in ``--weights`` order, each with the named weights that weigh it, and the
    defaults; for the CLI's help."""
    m = method(name)
    lines = []
    for form, s in (m.form_specs or {"": m}).items():
        terms = " ".join(t.name + (f"({'*'.join(t.factors)})" if t.factors else "") for t in s.terms)
        params = ", ".join(f"{k}={v:g}" for k, v in s.params)
        head = f"{name}" + (f" form={form}" + (" (ours)" if form in m.ours else "") if form else "")
        tie = "; " + ", ".join(f"{a} = {b}" for a, b in s.ties) + " unless alpha_gamma=untied" if s.ties else ""
        extra = [f"{k}={'|'.join(v)}" for k, v in s.options if k != "form"]
        lines.append(f"{head}: {terms}" + (f" [{params}{tie}]" if params else "")
                     + (f" options {', '.join(extra)}" if extra else ""))
    return "; ".join(lines)


__all__ = ["Term", "Method", "METHODS", "FORGETTING", "TRAINING", "method", "spec", "check_options", "term_weights",
           "resolved_params", "describe", "parse_weights"]
