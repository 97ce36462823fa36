"""The three objectives on hand-made embeddings whose answer is known, and where their gradients go."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from training import architectures, lora, lorentz, objectives
from training.encoder import SafetyEncoder
from training.objectives import Embeddings
from training.objectives.base import weighted_mean
from training.objectives.hysac import TERMS as HYSAC_TERMS
from training.objectives.safeclip import TERMS as SAFECLIP_TERMS
from training.objectives.safeclip import SafeClipObjective, info_nce
from training.trainer import TrainStep

B, D = 8, 16


class Scalars(torch.nn.Module):
    """The encoder scalars an objective reads: ``curv`` and ``logit_scale`` (both logs)."""

    def __init__(self, curv: float = 1.0, scale: float = 10.0):
        super().__init__()
        self.curv = torch.nn.Parameter(torch.tensor(math.log(curv)))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(scale)))


def _directions(seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(B, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _on_rays(radii: dict[str, float], seed: int = 0) -> dict[str, torch.Tensor]:
    """Each class's row i on the same ray from the origin (one random direction per row), at its own radius."""
    dirs = _directions(seed)
    return {c: lorentz.exp_map0(dirs * r, 1.0) for c, r in radii.items()}


ORDERED = {"s": 0.6, "v": 1.2, "u": 1.8, "g": 2.4}  # T > I > T* > I*: parents nearer the origin


def test_hysac_is_lower_for_aligned_pairs_than_for_shuffled_ones():
    obj = objectives.build("hysac")
    emb = _on_rays(ORDERED)
    aligned = obj(Embeddings(**emb), Scalars()).loss
    perm = torch.roll(torch.arange(B), 1)
    shuffled = obj(Embeddings(s=emb["s"], u=emb["u"], v=emb["v"][perm], g=emb["g"][perm]), Scalars()).loss
    assert aligned < shuffled


def test_hysac_entailment_terms_vanish_when_children_lie_beyond_their_parents_and_not_when_reversed():
    obj = objectives.build("hysac")
    ordered = obj(Embeddings(**_on_rays(ORDERED)), Scalars()).terms
    assert all(ordered[t] < 1e-6 for t in ("entail_TI", "entail_T*I*", "entail_IT*")), ordered
    reversed_ = {"s": 2.4, "v": 1.8, "u": 1.2, "g": 0.6}  # unsafe nearest the origin: every cone violated
    flipped = obj(Embeddings(**_on_rays(reversed_)), Scalars()).terms
    assert all(flipped[t] > 1.0 for t in ("entail_TI", "entail_T*I*", "entail_IT*")), flipped


def test_hysac_weights_follow_the_reference_normalisation():
    emb = Embeddings(**_on_rays({"s": 0.5, "v": 0.7, "u": 0.4, "g": 0.9}, seed=3))
    for eta in (0.0, 1.0, 2.5):
        out = objectives.build("hysac", eta=eta)(emb, Scalars())
        t = [out.terms[n] for n in HYSAC_TERMS]
        expected = (sum(t[:4]) + eta * sum(t[4:])) / (7 * (4 + 3 * eta))
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_hysac_logits_sharpen_with_the_scale():
    """A larger scale makes correct aligned pairs more certain: the contrastive terms fall."""
    emb = Embeddings(**_on_rays(ORDERED))
    obj = objectives.build("hysac")
    low, high = obj(emb, Scalars(scale=1 / 0.07)).terms, obj(emb, Scalars(scale=100.0)).terms
    assert high["contrastive_TI"] < low["contrastive_TI"]


def test_clip_is_lower_for_aligned_pairs_and_ignores_unsafe_halves():
    obj = objectives.build("clip")
    assert obj.uses_unsafe is False and obj.geometry == "euclidean"
    dirs = _directions()
    aligned = obj(Embeddings(s=dirs, v=dirs), Scalars()).loss
    shuffled = obj(Embeddings(s=dirs, v=dirs[torch.roll(torch.arange(B), 1)]), Scalars()).loss
    assert aligned < shuffled


def test_clip_on_all_pairs_also_separates_each_unsafe_caption_from_its_safe_image():
    obj = objectives.build("clip", clip_pairs="all")
    assert obj.uses_unsafe
    s, u = _directions(0), _directions(1)
    right = obj(Embeddings(s=s, v=s, u=u, g=u), Scalars()).loss
    crossed = obj(Embeddings(s=s, v=u, u=u, g=s), Scalars()).loss  # each caption matched to the other half's image
    assert right < crossed


def test_clip_on_all_pairs_leaves_out_the_unsafe_pairs_a_mask_drops_and_nothing_else():
    """The retrain-without oracle: a masked row's unsafe pair is neither a positive nor a negative, nor trained."""
    obj = objectives.build("clip", clip_pairs="all")
    s, v = _directions(0), _directions(1)
    u, g = _directions(2).requires_grad_(True), _directions(3).requires_grad_(True)
    kept = torch.tensor([True, False, True, True, False, True, True, True])
    loss = obj(Embeddings(s=s, v=v, u=u, g=g, unsafe_kept=kept), Scalars(scale=10.0)).loss
    assert loss.item() == pytest.approx(_nce_at(10.0, torch.cat([s, u[kept]]), torch.cat([v, g[kept]])), rel=1e-5)
    loss.backward()
    assert u.grad[~kept].abs().sum() == 0 and g.grad[~kept].abs().sum() == 0
    assert u.grad[kept].abs().sum() > 0
    everything = obj(Embeddings(s=s, v=v, u=u, g=g, unsafe_kept=torch.ones(B, dtype=torch.bool)), Scalars()).loss
    assert everything.item() == obj(Embeddings(s=s, v=v, u=u, g=g), Scalars()).loss.item()  # no mask: all kept


def test_with_gathered_negatives_the_mask_travels_with_every_rank_s_rows(monkeypatch):
    """As rank 1 of 2: rank 0's kept pairs are negatives, its left-out ones are not, and the positives shift past them."""
    from training import distributed

    obj = objectives.build("clip", clip_pairs="all", gather_negatives=True)
    s, v, u, g = (_directions(k) for k in range(4))
    kept = torch.tensor([True, False, True, True, False, True, True, True])
    text0, image0 = torch.cat([_directions(4), _directions(5)]), torch.cat([_directions(6), _directions(7)])
    kept0 = torch.tensor([True] * B + [False, True] * (B // 2))

    def rank_0_then_1(x):
        mine = torch.stack([text0, image0], dim=1) if x.dim() == 3 else kept0.float()[:, None]
        return torch.cat([mine, x]), x.shape[0]

    monkeypatch.setattr(distributed, "gather_with_grad", rank_0_then_1)
    loss = obj(Embeddings(s=s, v=v, u=u, g=g, unsafe_kept=kept), Scalars(scale=10.0)).loss
    mine = torch.cat([torch.ones(B, dtype=torch.bool), kept])
    text, image = torch.cat([s, u])[mine], torch.cat([v, g])[mine]
    text_all, image_all = torch.cat([text0[kept0], text]), torch.cat([image0[kept0], image])
    target = torch.arange(len(text)) + int(kept0.sum())
    expected = 0.5 * (F.cross_entropy(10.0 * text @ image_all.T, target) + F.cross_entropy(10.0 * image @ text_all.T, target))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_safeclip_redirection_at_the_reference_zeroes_the_cosine_terms():
    ref = SafetyEncoder(architectures.resolve("tiny"), "euclidean")
    obj = objectives.build("safeclip", reference=ref)
    s0, v0 = _directions(0), _directions(1)
    perfect = obj(Embeddings(s=s0, u=s0, v=v0, g=v0, s_ref=s0, v_ref=v0)).terms
    assert all(perfect[t] < 1e-6 for t in SAFECLIP_TERMS[:4]), perfect
    # unsafe embeddings elsewhere: the redirection terms (and the loss) grow
    away = obj(Embeddings(s=s0, u=-s0, v=v0, g=-v0, s_ref=s0, v_ref=v0))
    assert away.terms["cd_U_Sref"] == pytest.approx(2.0) and away.terms["cd_G_Vref"] == pytest.approx(2.0)
    assert away.loss > obj(Embeddings(s=s0, u=s0, v=v0, g=v0, s_ref=s0, v_ref=v0)).loss


def _nce_at(scale: float, a: Tensor, b: Tensor) -> float:
    logits = scale * a @ b.T
    target = torch.arange(len(a))
    return (0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))).item()


def test_safeclip_default_weights_and_fixed_scale():
    ref = SafetyEncoder(architectures.resolve("tiny"), "euclidean")
    obj = objectives.build("safeclip", reference=ref)
    assert obj.weights == (0.1, 0.1, 0.1, 0.2, 0.25, 0.25, 0.25, 0.5)
    a, b = _directions(0), _directions(1)
    assert info_nce(a * 3.0, b) == pytest.approx(_nce_at(100.0, a, b), rel=1e-5)  # normalised inside, CLIP's 100
    terms = [torch.tensor(float(i + 1)) for i in range(8)]
    w = torch.tensor(obj.weights)
    assert weighted_mean(terms, list(obj.weights)).item() == pytest.approx(((w / w.sum()) @ torch.arange(1.0, 9.0)).item() / 8)


def test_safeclip_infonce_scale_is_the_references_own():
    """OpenAI CLIP's learned scale is 100, the public code's constant; another reference keeps its own."""
    enc = SafetyEncoder(architectures.resolve("tiny"), "euclidean")
    a, b = _directions(0), _directions(1)
    emb = Embeddings(s=a, u=a, v=b, g=b, s_ref=a, v_ref=b)
    for scale in (100.0, 25.0):
        with torch.no_grad():
            enc.logit_scale.fill_(math.log(scale))
        obj = objectives.build("safeclip", reference=enc)
        assert float(obj.logit_scale) == pytest.approx(scale, rel=1e-5)
        assert obj(emb).terms["nce_S_Vref"].item() == pytest.approx(_nce_at(scale, a, b), rel=1e-5)
        with torch.no_grad():  # the scale is read from the reference (a resumed run reloads it), not cached
            obj.ref.logit_scale.fill_(math.log(50.0))
        assert float(obj.logit_scale) == pytest.approx(50.0, rel=1e-5)
    fixed = SafeClipObjective(enc, logit_scale=100.0)
    assert fixed.logit_scale == 100.0 and fixed(emb).terms["nce_S_Vref"].item() == pytest.approx(_nce_at(100.0, a, b), rel=1e-5)


def test_safeclip_reference_is_a_frozen_copy_not_the_trained_model():
    torch.manual_seed(0)
    enc = SafetyEncoder(architectures.resolve("tiny"), "euclidean")
    obj = objectives.build("safeclip", reference=enc)
    assert obj.ref is not enc
    assert all(not p.requires_grad for p in obj.ref.parameters())
    ref_ids = {id(p) for p in obj.ref.parameters()}
    assert not ref_ids & {id(p) for p in enc.parameters()}
    tokens = enc.tokenize(["a red umbrella on a beach"])
    before = obj.ref.embed_tokens(tokens).detach()
    with torch.no_grad():
        for p in enc.clip.parameters():
            p.add_(0.05)
    torch.testing.assert_close(obj.ref.embed_tokens(tokens), before)
    assert not torch.allclose(enc.embed_tokens(tokens), before, atol=1e-3)
    obj.train()
    assert obj.ref.training is False


def _batch(enc: SafetyEncoder, n: int = 4):
    g = torch.Generator().manual_seed(5)
    safe = enc.tokenize([f"a {c} umbrella on a beach" for c in ("red", "blue", "green", "pink")][:n])
    nsfw = enc.tokenize([f"a {c} gun on a beach" for c in ("red", "blue", "green", "pink")][:n])
    return safe, nsfw, torch.randn(n, 3, 64, 64, generator=g), torch.randn(n, 3, 64, 64, generator=g)


def test_full_finetune_trains_every_weight_the_forward_uses():
    """No parameter is left trainable but unused (DDP without find_unused_parameters would stall on it)."""
    from training.optim import prepare_encoder
    from training.recipes import TrainConfig

    torch.manual_seed(0)
    enc = SafetyEncoder(architectures.resolve("tiny"), "lorentz")
    prepare_encoder(enc, objectives.HySACObjective, TrainConfig(full_finetune=True))
    step = TrainStep(enc, objectives.build("hysac"))
    step(*_batch(enc))[0].backward()
    unused = [n for n, p in enc.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    assert enc.clip.visual.conv1.weight.grad is not None and enc.clip.token_embedding.weight.grad is not None


@pytest.mark.parametrize("method", ["hysac", "safeclip", "clip"])
def test_gradients_reach_only_the_adapters_and_the_scalars_the_method_trains(method):
    from training.optim import prepare_encoder
    from training.recipes import TrainConfig

    torch.manual_seed(0)
    cls = objectives.objective_class(method)
    enc = SafetyEncoder(architectures.resolve("tiny"), cls.geometry)
    reference = SafetyEncoder(architectures.resolve("tiny"), cls.geometry) if method == "safeclip" else None
    prepare_encoder(enc, cls, TrainConfig(method=method, lora_rank=4, full_finetune=False))
    step = TrainStep(enc, objectives.build(method, reference=reference))
    loss, terms = step(*_batch(enc))
    loss.backward()
    for name, p in step.named_parameters():
        if name.startswith("objective."):  # the frozen Safe-CLIP reference
            assert not p.requires_grad and p.grad is None, name
            continue
        scalar = name.removeprefix("encoder.")  # the encoder's own scalars, not open_clip's unused ones
        trained = ".lora_A." in name or ".lora_B." in name or scalar in cls.trained_scalars
        assert p.requires_grad == trained, name
        if trained:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for p in lora.lora_parameters(enc))
    if method == "hysac":
        assert enc.curv.grad is not None and enc.visual_alpha.grad is not None
    assert set(terms) == set({"hysac": HYSAC_TERMS, "safeclip": SAFECLIP_TERMS, "clip": ("contrastive_TI",)}[method])


def test_without_a_process_group_gathering_is_the_identity():
    obj = objectives.build("hysac", gather_negatives=True)
    x, y = _directions(0), _directions(1)
    (gx, gy), offset = obj.gather(x, y)
    assert offset == 0 and torch.equal(gx, x) and torch.equal(gy, y)


def test_unknown_method_is_an_input_error():
    from training.errors import InputError

    with pytest.raises(InputError, match="hysac, safeclip, clip, cliperase, ac, hac, ga, graddiff, kl"):
        objectives.build("erase")
