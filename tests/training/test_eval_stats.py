"""Intervals, probes and floors of the evaluation: the bootstrap's coverage and determinism, the linear probe
pinned to the former residue probe, the MLP probe's reach and early stopping, raw pixels, the random model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from training import architectures, artifact
from training.encoder import SafetyEncoder
from training.errors import ImageError, InputError
from training.eval import probes, stats
from training.images import open_image


def _bernoulli(n: int, p: float, seed: int = 0) -> Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p


# ------------------------------------------------------------------------------------------- intervals
def test_the_interval_holds_the_point_estimate_and_narrows_as_one_over_root_n():
    small, large = _bernoulli(100, 0.3), _bernoulli(1600, 0.3, seed=1)
    widths = []
    for hits in (small, large):
        point = round(100 * hits.double().mean().item(), 1)
        lo, hi = stats.bootstrap_mean(hits)
        assert lo < point < hi
        widths.append(hi - lo)
    # 16 times the items: a quarter of the width (the normal approximation gives 18.0 and 4.5 points)
    assert 3 < widths[0] / widths[1] < 5.5
    assert 14 < widths[0] < 22


def test_intervals_are_deterministic_per_seed_and_leave_the_global_rng_alone():
    hits = _bernoulli(200, 0.5)
    state = torch.get_rng_state()
    first = stats.bootstrap_mean(hits, seed=3)
    assert stats.bootstrap_mean(hits, seed=3) == first
    assert stats.bootstrap_mean(hits.tolist(), seed=3) == first  # a list of bools reads as the tensor does
    assert stats.bootstrap_mean(hits, seed=4) != first
    assert torch.equal(torch.get_rng_state(), state)


def test_level_widens_the_interval_and_bad_arguments_are_refused():
    hits = _bernoulli(300, 0.4)
    lo90, hi90 = stats.bootstrap_mean(hits, level=0.9)
    lo99, hi99 = stats.bootstrap_mean(hits, level=0.99)
    assert lo99 < lo90 and hi90 < hi99
    with pytest.raises(InputError, match="level"):
        stats.bootstrap_mean(hits, level=95)
    with pytest.raises(InputError, match="1-D"):
        stats.bootstrap_mean(torch.zeros(3, 2))


def test_no_items_no_interval():
    assert stats.bootstrap_mean([]) is None
    assert stats.bootstrap_difference([], []) is None
    assert stats.bootstrap_balanced_accuracy(torch.tensor([True, False]), torch.tensor([True, True])) is None
    assert stats.balanced_accuracy(torch.tensor([True]), torch.tensor([True])) is None


def test_the_paired_difference_moves_with_the_items_not_with_two_noises():
    a = _bernoulli(400, 0.6)
    assert stats.bootstrap_difference(a, a) == (0.0, 0.0)
    b = a.clone()
    b[:40] = False  # 40 items lost, some of which were already misses
    diff = 100 * (a.double().mean() - b.double().mean()).item()
    lo, hi = stats.bootstrap_difference(a, b)
    assert 0 < lo < diff < hi
    # paired: far narrower than two independent accuracies' intervals would make the difference's
    (lo_a, hi_a), (lo_b, hi_b) = stats.bootstrap_mean(a), stats.bootstrap_mean(b)
    assert hi - lo < 0.6 * math.hypot(hi_a - lo_a, hi_b - lo_b)
    with pytest.raises(InputError, match="one a and one b"):
        stats.bootstrap_difference(a, b[:-1])


def test_balanced_accuracy_interval_is_stratified():
    truth = torch.zeros(200, dtype=torch.bool)
    truth[:3] = True  # so rare that unstratified resamples would often hold no positive
    assert stats.bootstrap_balanced_accuracy(truth, truth) == (100.0, 100.0)
    assert stats.bootstrap_balanced_accuracy(~truth, truth) == (0.0, 0.0)
    pred = truth.clone()
    pred[0] = False  # TPR 2/3, TNR 1
    assert stats.balanced_accuracy(pred, truth) == 83.3
    lo, hi = stats.bootstrap_balanced_accuracy(pred, truth)
    assert lo == 50.0 and hi == 100.0  # TPR* in {0, 1/3, 2/3, 1} over three drawn positives


def test_interval_text():
    assert stats.interval_text(67.9, (58.1, 76.2)) == "67.9 [58.1, 76.2]"
    assert stats.interval_text(50, None) == "50.0"
    assert stats.interval_text(None, None) == "–"


# ---------------------------------------------------------------------------------------------- probes
def _former_residue_probe(train_x, train_y, test_x, test_y, *, l2=1e-3, steps=200) -> float:
    """the former ``probe_balanced_accuracy`` of the unlearning evaluation as it was before ``linear_probe`` replaced it,
    verbatim but for the helper it rounded with: the numbers the residue figures were published with."""
    x = train_x.detach().double().cpu()
    y = train_y.detach().bool().cpu()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    n, pos = len(y), int(y.sum())
    weight = torch.where(y, n / (2 * pos), n / (2 * (n - pos))).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = xs @ w + b
        loss = F.binary_cross_entropy_with_logits(logits, y.double(), weight=weight) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (((test_x.detach().double().cpu() - mean) / std) @ w + b) > 0
    t = test_y.detach().bool().cpu()
    tpr = float(pred[t].double().mean())
    tnr = float((~pred[~t]).double().mean())
    return round(100 * float((tpr + tnr) / 2), 1)


@pytest.mark.parametrize("d,shift", [(16, 0.0), (64, 0.4), (128, 1.0)])
def test_the_linear_probe_gives_the_former_residue_probe_s_numbers(d, shift):
    g = torch.Generator().manual_seed(d)
    x, xt = torch.randn(600, d, generator=g), torch.randn(300, d, generator=g)
    y, yt = torch.rand(600, generator=g) < 0.15, torch.rand(300, generator=g) < 0.15
    x[y, :4] += shift
    xt[yt, :4] += shift
    result = probes.linear_probe(x, y, xt, yt)
    assert result.balanced_accuracy == _former_residue_probe(x, y, xt, yt)
    assert result.pred.dtype == torch.bool and result.pred.shape == (300,)
    assert stats.balanced_accuracy(result.pred, yt) == result.balanced_accuracy


def test_a_probe_needs_both_classes_to_train():
    x = torch.randn(10, 3)
    with pytest.raises(InputError, match="both positive and negative"):
        probes.linear_probe(x, torch.zeros(10, dtype=torch.bool), x, torch.ones(10, dtype=torch.bool))


def _xor(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Two informative coordinates whose signs agree for the positives, six of noise: no hyperplane helps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 8, generator=g) * 2 - 1
    return x, (x[:, 0] * x[:, 1]) > 0


def test_the_mlp_probe_reads_what_the_linear_one_cannot():
    (x, y), (xt, yt) = _xor(2000, 0), _xor(500, 1)
    assert 35 <= probes.linear_probe(x, y, xt, yt).balanced_accuracy <= 65
    state = torch.get_rng_state()
    mlp = probes.mlp_probe(x, y, xt, yt)
    assert mlp.balanced_accuracy > 90
    assert torch.equal(torch.get_rng_state(), state)
    again = probes.mlp_probe(x, y, xt, yt)
    assert torch.equal(again.pred, mlp.pred) and again.history == mlp.history


def test_early_stopping_keeps_the_best_validation_epoch():
    g = torch.Generator().manual_seed(5)
    x, xt = torch.randn(400, 16, generator=g), torch.randn(200, 16, generator=g)
    y, yt = torch.rand(400, generator=g) < 0.3, torch.rand(200, generator=g) < 0.3
    x[y, 0] += 0.6  # a weak signal among noise: validation peaks, then the fit overfits
    xt[yt, 0] += 0.6
    r = probes.mlp_probe(x, y, xt, yt, patience=5, max_epochs=100, batch_size=64)
    assert r.history[r.best_epoch] == max(r.history) == r.val_balanced_accuracy
    assert len(r.history) == r.best_epoch + 1 + 5 < 100  # stopped `patience` epochs after the best
    # the kept weights are the best epoch's: a run that ends at that epoch answers the same
    short = probes.mlp_probe(x, y, xt, yt, patience=5, max_epochs=r.best_epoch + 1, batch_size=64)
    assert torch.equal(short.pred, r.pred) and short.best_epoch == r.best_epoch
    assert probes.mlp_probe(x, y, xt, yt, patience=5, max_epochs=100, batch_size=64, seed=1).history != r.history


def test_the_validation_slice_needs_two_items_of_each_class():
    x, y = torch.randn(20, 4), torch.zeros(20, dtype=torch.bool)
    y[0] = True
    with pytest.raises(InputError, match="at least 2 train items of each class"):
        probes.mlp_probe(x, y, x, y)


# ---------------------------------------------------------------------------------------------- floors
def _pngs(tmp_path) -> list:
    images = {"red.png": Image.new("RGB", (40, 20), (255, 0, 0)), "grey.png": Image.new("L", (10, 10), 128),
              "clear.png": Image.new("RGBA", (16, 16), (0, 0, 255, 0))}
    for name, im in images.items():
        im.save(tmp_path / name)
    return [tmp_path / name for name in images]


def test_pixel_features_are_resized_rgb_in_the_unit_range(tmp_path):
    paths = _pngs(tmp_path)
    feats = probes.pixel_features(paths, size=8)
    assert feats.shape == (3, 3 * 8 * 8) and feats.dtype == torch.float32
    assert 0 <= feats.min() and feats.max() <= 1
    red, grey, blue = feats.reshape(3, 3, 8, 8)  # channel-first
    assert torch.equal(red[0], torch.ones(8, 8)) and not red[1:].any()
    assert torch.allclose(grey, torch.full((3, 8, 8), 128 / 255))
    assert torch.equal(blue[2], torch.ones(8, 8)) and not blue[:2].any()
    assert probes.pixel_features([]).shape == (0, 3 * 32 * 32)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="broken.png"):
        probes.pixel_features([tmp_path / "broken.png"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Lorentz artifact as the evaluation loads it, with a curvature and logit scale off their defaults."""
    torch.manual_seed(7)  # not a seed the tests draw random models with: those would equal this one
    enc = SafetyEncoder(architectures.resolve("tiny"), "lorentz")
    with torch.no_grad():
        enc.curv.fill_(math.log(2.0))
        enc.logit_scale.fill_(math.log(50.0))
    path = tmp_path_factory.mktemp("random-init") / "trained"
    artifact.save(artifact.Artifact(enc, bounds={"V": {"p50": 1.0}}, provenance=artifact.provenance("test")), path)
    return artifact.load(path, device="cpu")


def test_the_random_model_has_the_artifact_s_shape_and_space_but_fresh_weights(trained, tmp_path):
    state = torch.get_rng_state()
    rand = probes.random_init_encoder(trained, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(rand, artifact.Artifact) and rand.geometry == "lorentz"
    assert rand.curvature == pytest.approx(2.0) and rand.curvature == trained.curvature
    assert float(rand.encoder.logit_scale.detach().exp()) == pytest.approx(50.0)
    assert rand.bounds == {} and rand.provenance["seed"] == 0 and not rand.encoder.training
    ours, theirs = rand.encoder.state_dict(), trained.encoder.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert not torch.equal(ours["clip.visual.conv1.weight"], theirs["clip.visual.conv1.weight"])
    # the evaluation's code path embeds with it: same dimension, a different model
    images = [open_image(p) for p in _pngs(tmp_path)]
    emb, ref = rand.encoder.encode_image(images), trained.encoder.encode_image(images)
    assert emb.shape == ref.shape == (3, trained.encoder.arch.embed_dim)
    assert torch.isfinite(emb).all() and not torch.allclose(emb, ref)
    assert rand.encoder.encode_text(["a red ball"]).shape == (1, trained.encoder.arch.embed_dim)


def test_the_random_model_is_deterministic_per_seed(trained):
    a, b = probes.random_init_encoder(trained, seed=0), probes.random_init_encoder(trained, seed=0)
    c = probes.random_init_encoder(trained, seed=1)
    key = "clip.transformer.resblocks.0.attn.in_proj_weight"
    assert all(torch.equal(v, b.encoder.state_dict()[k]) for k, v in a.encoder.state_dict().items())
    assert not torch.equal(a.encoder.state_dict()[key], c.encoder.state_dict()[key])


def test_the_mean_of_several_balanced_accuracies_has_an_interval_around_it():
    g = torch.Generator().manual_seed(0)
    truths = [torch.rand(400, generator=g) < 0.2 for _ in range(3)]
    preds = [t ^ (torch.rand(400, generator=g) < flip) for t, flip in zip(truths, (0.05, 0.2, 0.4), strict=True)]
    mean = sum(stats.balanced_accuracy(p, t) for p, t in zip(preds, truths, strict=True)) / 3
    lo, hi = stats.bootstrap_mean_balanced_accuracy(preds, truths, seed=1)
    assert lo < mean < hi and hi - lo < 10
    assert stats.bootstrap_mean_balanced_accuracy([torch.ones(5, dtype=torch.bool)], [torch.ones(5, dtype=torch.bool)]) is None
