"""AC's and HAC's terms against plain loops written from the papers' equations (reference notes §2.2, §2.3a).

A hand-made batch of N = 2 retain pairs (s, v) and 2 forget pairs (u, g); each term of
:mod:`training.objectives.unlearning` must equal a loop over Python floats that follows its
equation symbol by symbol, with sim = cosine (Euclidean) or -d_L (Lorentz), tau = 1/exp(logit_scale).
"""

from __future__ import annotations

import math

import pytest
import torch

from training import methods, objectives, recipes
from training.errors import InputError
from training.lorentz import MIN_RADIUS
from training.objectives import Embeddings
from training.objectives import unlearning as U

CURV, SCALE = 0.7, 5.0
TAU = 1 / SCALE
ANGLE = 1e-3  # lorentz.oxy_angle guards its denominator with eps = 1e-5: its angles differ from exact ones by ~5e-4 rad

# hand-made space components: g_0 lies near u_0's ray beyond it (inside its cone: L_f-ent is active for pair 0), v_1 far
# from s_1's cone (L_r-ent is active for pair 1); the Euclidean batch normalises the same rows
RAW = {
    "s": [[0.5, 0.1, 0.0], [0.0, 0.6, 0.2]],
    "v": [[0.9, 0.2, 0.1], [0.3, -0.4, 0.8]],
    "u": [[0.3, -0.4, 0.7], [-0.6, 0.2, 0.3]],
    "g": [[0.5, -0.62, 1.1], [0.1, 0.7, -0.5]],
}


class Encoder(torch.nn.Module):
    """The encoder scalars the objectives read: geometry, ``curv`` and ``logit_scale`` (both logs)."""

    def __init__(self, geometry: str):
        super().__init__()
        self.geometry = geometry
        self.curv = torch.nn.Parameter(torch.tensor(math.log(CURV)))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(SCALE)))


def _rows(geometry: str) -> dict[str, list[list[float]]]:
    if geometry == "lorentz":
        return RAW
    return {k: [[x / _norm(r) for x in r] for r in rows] for k, rows in RAW.items()}


def _tensors(geometry: str) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(rows, dtype=torch.float32) for k, rows in _rows(geometry).items()}


# ------------------------------------------------------------------------- the equations, as plain loops
def _norm(x):
    return math.sqrt(sum(a * a for a in x))


def _time(x):
    return math.sqrt(1 / CURV + sum(a * a for a in x))


def _dist(x, y):
    """Geodesic distance on the hyperboloid of curvature -CURV: acosh(-c <x, y>_L) / sqrt(c)."""
    inner = sum(a * b for a, b in zip(x, y, strict=True)) - _time(x) * _time(y)
    return math.acosh(max(-CURV * inner, 1.0)) / math.sqrt(CURV)


def _sim(x, t, geometry):
    if geometry == "lorentz":
        return -_dist(x, t)
    return sum(a * b for a, b in zip(x, t, strict=True)) / (_norm(x) * _norm(t))


def _aper(t):
    """Half-aperture of t's cone: asin(2K / (sqrt(c) |t|))."""
    return math.asin(2 * MIN_RADIUS / (math.sqrt(CURV) * _norm(t)))


def _ext(x, t):
    """Exterior angle at t of the triangle O-t-x: pi minus the interior angle, by the hyperbolic law of cosines."""
    origin = [0.0] * len(t)
    a, b, e = (math.sqrt(CURV) * d for d in (_dist(origin, t), _dist(t, x), _dist(origin, x)))
    cos = (math.cosh(a) * math.cosh(b) - math.cosh(e)) / (math.sinh(a) * math.sinh(b))
    interior = math.acos(min(1.0, max(-1.0, cos)))
    return math.pi - interior


def loop_retain(s, v, u, g, geometry):
    n = len(s)
    t_all, x_all = s + u, v + g
    total = 0.0
    for i in range(n):
        pos = math.exp(_sim(v[i], s[i], geometry) / TAU)
        total += math.log(pos / sum(math.exp(_sim(v[i], t_all[j], geometry) / TAU) for j in range(2 * n)))
        total += math.log(pos / sum(math.exp(_sim(x_all[j], s[i], geometry) / TAU) for j in range(2 * n)))
    return -total / (2 * n)


def loop_neg(u, g, geometry):
    n = len(u)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if j != i:
                total += (_sim(g[i], u[j], geometry) + _sim(g[j], u[i], geometry)) / TAU
    return -total / (2 * n * n)


def loop_pos(u, g, geometry):
    return sum(_sim(g[i], u[i], geometry) / TAU for i in range(len(u))) / len(u)


def loop_perf(s, v, u, g, geometry):
    n = len(u)
    t_all, x_all = s + u, v + g
    total = 0.0
    for i in range(n):
        total += math.log(sum(math.exp(_sim(g[i], t_all[j], geometry) / TAU) for j in range(2 * n)) / (2 * n))
        total += math.log(sum(math.exp(_sim(x_all[j], u[i], geometry) / TAU) for j in range(2 * n)) / (2 * n))
    return total / (2 * n)


def loop_retain_entailment(s, v):
    return sum(max(0.0, _ext(v[i], s[i]) - _aper(s[i])) for i in range(len(s))) / len(s)


def loop_forget_entailment(u, g):
    return sum(max(0.0, _aper(u[i]) - _ext(g[i], u[i])) for i in range(len(u))) / len(u)


def loop_norm(u, g):
    return sum(_norm(g[i]) + _norm(u[i]) for i in range(len(u))) / len(u)


def loops(geometry: str) -> dict[str, float]:
    r = _rows(geometry)
    s, v, u, g = r["s"], r["v"], r["u"], r["g"]
    out = {"retain_contrastive": loop_retain(s, v, u, g, geometry), "negative_calibration": loop_neg(u, g, geometry),
           "positive_calibration": loop_pos(u, g, geometry), "performance": loop_perf(s, v, u, g, geometry)}
    if geometry == "lorentz":
        out.update(retain_entailment=loop_retain_entailment(s, v), forget_entailment=loop_forget_entailment(u, g),
                   norm_regularisation=loop_norm(u, g))
    return out


# ------------------------------------------------------------------------------------------- each term
def test_the_hand_made_batch_exercises_both_sides_of_every_hinge():
    r = RAW
    assert _aper(r["u"][0]) - _ext(r["g"][0], r["u"][0]) > 0.1  # forget image 0 inside its caption's cone
    assert _ext(r["v"][1], r["s"][1]) - _aper(r["s"][1]) > 0.1  # retain image 1 outside its caption's cone
    assert _ext(r["v"][0], r["s"][0]) < _aper(r["s"][0])  # retain image 0 inside: no penalty


@pytest.mark.parametrize("geometry", ["euclidean", "lorentz"])
def test_each_ac_term_is_its_equation(geometry):
    t, enc, want = _tensors(geometry), Encoder(geometry), loops(geometry)
    s, v, u, g = t["s"], t["v"], t["u"], t["g"]
    got = {
        "retain_contrastive": U.retain_contrastive(s, v, u, g, enc),
        "negative_calibration": U.negative_calibration(u, g, enc),
        "positive_calibration": U.positive_calibration(u, g, enc),
        "performance": U.performance(s, v, u, g, enc),
    }
    for name, value in got.items():
        assert float(value.detach()) == pytest.approx(want[name], rel=1e-5, abs=1e-6), name


def test_each_hac_only_term_is_its_equation():
    t, want = _tensors("lorentz"), loops("lorentz")
    curv = torch.tensor(CURV)
    assert float(U.retain_entailment(t["s"], t["v"], curv)) == pytest.approx(want["retain_entailment"], abs=ANGLE)
    assert float(U.forget_entailment(t["u"], t["g"], curv)) == pytest.approx(want["forget_entailment"], abs=ANGLE)
    assert float(U.norm_regularisation(t["u"], t["g"])) == pytest.approx(want["norm_regularisation"], rel=1e-6)
    assert want["retain_entailment"] > 0 and want["forget_entailment"] > 0


# ------------------------------------------------------------------------------------- the combination
@pytest.mark.parametrize("name, geometry, params", [
    ("ac", "euclidean", {}),
    ("ac", "euclidean", {"epsilon": 2.0, "alpha": 0.3, "gamma": 0.3, "beta": 0.2}),
    ("ac", "lorentz", {"beta": 0.25}),  # AC on a Lorentz model: sim = -d_L
    ("hac", "lorentz", {}),
    ("hac", "lorentz", {"epsilon": 1.5, "alpha": 0.4, "gamma": 0.4, "beta": 0.1, "omega_r": 0.7, "omega_f": 1.3,
                        "lambda": 0.2}),
])
def test_the_loss_is_retain_plus_epsilon_times_the_calibrations_plus_the_hyperbolic_terms(name, geometry, params):
    p = {**methods.method(name).defaults, **params}
    want = loops(geometry)
    expected = want["retain_contrastive"] + p["epsilon"] * (
        p["alpha"] * want["negative_calibration"] + p["beta"] * want["positive_calibration"]
        + p["gamma"] * want["performance"])
    if name == "hac":
        expected += (p["omega_r"] * want["retain_entailment"] + p["omega_f"] * want["forget_entailment"]
                     + p["lambda"] * want["norm_regularisation"])
    obj = objectives.build(name, params=params or None)
    out = obj(Embeddings(**_tensors(geometry)), Encoder(geometry))
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5, abs=2 * ANGLE)
    assert list(out.terms) == list(methods.method(name).term_names)
    for term, value in out.terms.items():
        assert float(value) == pytest.approx(want[term], rel=1e-5, abs=ANGLE if "entailment" in term else 1e-6), term
    assert obj.provenance()["params"] == p and obj.provenance()["options"] == {"form": "paper"}


def test_the_defaults_are_the_papers_best_rows():
    # alpha = gamma 0.75, beta 0.5 (the paper's best row), times our epsilon 0.03
    assert objectives.build("ac").weights == pytest.approx((1.0, 0.0225, 0.015, 0.0225))
    # alpha = gamma 0.5, beta 0.5, times our epsilon 0.1; omega_r = omega_f = 1; lambda 0: HAC, not HAC-reg
    assert objectives.build("hac").weights == pytest.approx((1.0, 0.05, 0.05, 0.05, 1.0, 1.0, 0.0))
    assert methods.method("ac").defaults["alpha"] == methods.method("ac").defaults["gamma"] == 0.75
    assert objectives.reference_weights("hac") == methods.method("hac").default_weights()


def test_positional_weights_are_one_per_term_in_the_methods_order():
    weights = (1.0, 0.2, 0.3, 0.2, 0.5, 0.6, 0.7)
    out = objectives.build("hac", weights=weights)(Embeddings(**_tensors("lorentz")), Encoder("lorentz"))
    want = loops("lorentz")
    expected = sum(w * want[n] for w, n in zip(weights, want, strict=True))
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5, abs=2 * ANGLE)


# ------------------------------------------------------------------------------------------- form=ours
def test_form_ours_is_labelled_ours_and_has_its_own_terms_and_defaults():
    assert "ours" in methods.method("ac").ours and methods.method("ac").option_values["form"] == ("paper", "ours")
    ac = objectives.build("ac", options={"form": "ours"})
    assert ac.weights == (1.0, 1.0, 1.0, 0.1) and ac.provenance()["options"] == {"form": "ours"}
    hac = objectives.build("hac", options={"form": "ours", "norm": "grow"})
    assert hac.terms == ("retain_contrastive", "retain_entailment", "negative_calibration", "positive_calibration",
                         "forget_entailment", "norm")
    assert hac.weights == (1.0, 1.0, 1.0, 1.0, 1.0, 0.1)
    assert hac.identity() == {"options": {"form": "ours", "norm": "grow"}}  # a resumed run must use the same form


# the values the code had before the papers' equations replaced it (commit a326d32), on this batch
@pytest.mark.parametrize("name, geometry, options, loss, terms", [
    ("ac", "euclidean", {}, 2.469144821166992,
     {"retain_contrastive": 1.004263, "negative_calibration": 1.19822, "positive_calibration": 0.4421492,
      "performance": -1.754867}),
    ("ac", "euclidean", {"perf": "none"}, 2.6446313858032227, {"performance": 0.0}),
    ("hac", "lorentz", {}, 3.9773526191711426,
     {"retain_contrastive": 0.7110982, "retain_entailment": 0.9880004, "negative_calibration": 1.582805,
      "positive_calibration": 0.5083964, "forget_entailment": 0.1012222, "norm": 0.8583043}),
    ("hac", "lorentz", {"positive": "neg-dist", "norm": "grow"}, 2.6787171363830566,
     {"positive_calibration": -0.7474929, "norm": 0.430843}),
])
def test_form_ours_reproduces_the_values_of_before(name, geometry, options, loss, terms):
    out = objectives.build(name, options={"form": "ours", **options})(Embeddings(**_tensors(geometry)), Encoder(geometry))
    assert float(out.loss.detach()) == pytest.approx(loss, rel=1e-5)
    for term, value in terms.items():
        assert float(out.terms[term].detach()) == pytest.approx(value, rel=1e-5, abs=1e-6), term


# ------------------------------------------------------------------------------------------- bad input
def _resolve(tmp_path, **kw) -> recipes.TrainConfig:
    base = dict(method="ac", data=tmp_path / "data", out=tmp_path / "out", model=str(tmp_path), forget=("knife",),
                device="cpu")
    return recipes.resolve_config(recipes.TrainConfig(**{**base, **kw}))


@pytest.mark.parametrize("kw, message", [
    ({"params": {"delta": 1.0}}, r"ac has no weight 'delta'; its weights: epsilon \(default 0.03\), alpha"),
    ({"params": {"beta": -0.5}}, "non-negative finite numbers; got beta=-0.5"),
    ({"params": {"beta": float("nan")}}, "non-negative finite numbers; got beta=nan"),
    ({"weights": (1.0, 0.5)}, "ac takes 4 non-negative weights.*retain_contrastive negative_calibration"),
    ({"weights": (1.0, -0.5, 0.5, -0.5)}, "ac takes 4 non-negative weights"),
    ({"params": {"alpha": 0.5}}, "ac keeps alpha = gamma.*alpha=0.5, gamma=0.75.*alpha_gamma=untied"),
    ({"weights": (1.0, 0.5, 0.5, 0.75)}, "negative_calibration and performance weights differ.*alpha_gamma=untied"),
    ({"params": {"lambda": 1.0}}, "ac has no weight 'lambda'"),  # hac's, not ac's
    ({"objective_options": ("perf=none",)}, "perf=none belongs to ac's form=ours.*add the option form=ours"),
    ({"objective_options": ("norm=grow",)}, "ac has no option 'norm'"),
    ({"objective_options": ("form=theirs",)}, "form=theirs: use one of paper, ours"),
    ({"objective_options": ("form=ours", "alpha_gamma=untied")}, "alpha_gamma=untied belongs to ac's form=paper"),
    ({"method": "hac", "objective_options": ("norm=grow",)}, "norm=grow belongs to hac's form=ours"),
    ({"method": "hysac", "forget": (), "model": "tiny", "params": {"alpha": 1.0}}, r"named weights \(NAME=VALUE\) go "
     "with the unlearning methods"),
    ({"method": "ga", "params": {"ascent": 2.0}}, "single loss term"),
    ({"params": {"alpha": 1.0}, "eta": 1.0}, "--eta or --weights, not both"),
])
def test_bad_weights_and_options_are_refused_before_training(tmp_path, kw, message):
    with pytest.raises(InputError, match=message):
        _resolve(tmp_path, **kw)
    assert not (tmp_path / "out").exists()


def test_untied_alpha_and_gamma_and_named_weights_of_form_ours_are_accepted(tmp_path):
    cfg = _resolve(tmp_path, params={"alpha": 0.5}, objective_options=("alpha_gamma=untied",))
    assert cfg.params == {"alpha": 0.5} and cfg.weights is None
    assert objectives.build("ac", params=cfg.params, options={"alpha_gamma": "untied"}).weights == pytest.approx(
        (1, 0.03 * 0.5, 0.03 * 0.5, 0.03 * 0.75))  # epsilon (0.03) times alpha, beta, gamma
    cfg = _resolve(tmp_path, params={"gamma": 0.5}, objective_options=("form=ours", "perf=none"))
    assert methods.term_weights("ac", params=cfg.params, options={"form": "ours"}) == (1.0, 1.0, 1.0, 0.5)
    assert _resolve(tmp_path, weights=(1, 0.5, 0.5, 0.5)).weights == (1.0, 0.5, 0.5, 0.5)


def test_the_weights_flag_parses_numbers_or_names_but_not_a_mix():
    assert methods.parse_weights("1,0.5") == ((1.0, 0.5), None)
    assert methods.parse_weights("alpha=0.5, beta=0.25") == (None, {"alpha": 0.5, "beta": 0.25})
    with pytest.raises(InputError, match="not a mix"):
        methods.parse_weights("1,alpha=0.5")
    with pytest.raises(InputError, match="NAME=VALUE pairs"):
        methods.parse_weights("alpha=x")
    with pytest.raises(InputError, match="names 'alpha' twice"):
        methods.parse_weights("alpha=1,alpha=2")
