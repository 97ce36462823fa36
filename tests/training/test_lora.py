"""LoRA adapters on open_clip: what is adapted, that merging is exact, and that q is never touched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training import architectures, lora
from training.encoder import SafetyEncoder

RANK = 4


@pytest.fixture()
def encoder():
    torch.manual_seed(0)
    return SafetyEncoder(architectures.resolve("tiny"))


def _randomise_adapters(model: torch.nn.Module) -> None:
    """B starts at zero (no-op adapters); give every A and B values so the deltas are real."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _inputs(enc: SafetyEncoder):
    tokens = enc.tokenize(["a red umbrella on a beach", "a gun in a kitchen with a cup"])
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    return tokens, pixels


def _embed(enc: SafetyEncoder, tokens, pixels):
    enc.eval()
    with torch.no_grad():
        return enc.embed_tokens(tokens), enc.embed_pixels(pixels)


def test_adapters_sit_on_k_v_out_mlp_and_patch_embedding_only(encoder):
    adapted = lora.apply_lora(encoder.clip, rank=RANK)
    blocks = len(encoder.clip.visual.transformer.resblocks) + len(encoder.clip.transformer.resblocks)
    # per block: in_proj (k and v slices), out_proj, c_fc, c_proj; plus the vision patch embedding
    assert len(adapted) == 4 * blocks + 1
    assert "visual.conv1.weight" in adapted
    assert not any("proj" in a and ("text_projection" in a or a.endswith("visual.proj")) for a in adapted)
    attn = encoder.clip.transformer.resblocks[0].attn
    delta = attn.parametrizations.in_proj_weight[0]
    w = attn.embed_dim
    assert delta.slices == [(w, 2 * w), (2 * w, 3 * w)]  # k and v rows; q rows (0, w) have no adapter
    trainable = {n for n, p in encoder.clip.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora.lora_parameters(encoder.clip)) == 2 * (5 * blocks + 1)


def test_fresh_adapters_leave_the_model_unchanged(encoder):
    """B starts at zero, so the adapted model computes the base model."""
    tokens, pixels = _inputs(encoder)
    before = _embed(encoder, tokens, pixels)
    lora.apply_lora(encoder.clip, rank=RANK)
    after = _embed(encoder, tokens, pixels)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # same weights; kernels may sum in another order


def test_merged_model_equals_the_adapted_one_and_loads_into_a_plain_encoder(encoder):
    tokens, pixels = _inputs(encoder)
    base = _embed(encoder, tokens, pixels)
    lora.apply_lora(encoder.clip, rank=RANK)
    _randomise_adapters(encoder.clip)
    adapted = _embed(encoder, tokens, pixels)
    assert not torch.allclose(adapted[0], base[0], atol=1e-4), "the adapters should change the embeddings"
    assert not torch.allclose(adapted[1], base[1], atol=1e-4)

    assert lora.merge_lora(encoder.clip) == 25
    assert not lora.has_lora(encoder)
    merged = _embed(encoder, tokens, pixels)
    for a, m in zip(adapted, merged, strict=True):
        torch.testing.assert_close(m, a, rtol=1e-5, atol=1e-5)

    plain = SafetyEncoder(architectures.resolve("tiny"))
    assert set(plain.state_dict()) == set(encoder.state_dict())
    plain.load_state_dict(encoder.state_dict(), strict=True)
    for a, p in zip(adapted, _embed(plain, tokens, pixels), strict=True):
        torch.testing.assert_close(p, a, rtol=1e-5, atol=1e-5)


def test_merging_changes_k_and_v_rows_but_never_q(encoder):
    attn = encoder.clip.visual.transformer.resblocks[1].attn
    original = attn.in_proj_weight.detach().clone()
    w = attn.embed_dim
    lora.apply_lora(encoder.clip, rank=RANK)
    _randomise_adapters(encoder.clip)
    lora.merge_lora(encoder.clip)
    merged = attn.in_proj_weight.detach()
    torch.testing.assert_close(merged[:w], original[:w], rtol=0, atol=0)
    assert not torch.allclose(merged[w : 2 * w], original[w : 2 * w])
    assert not torch.allclose(merged[2 * w :], original[2 * w :])


def test_patch_embedding_adapter_is_a_conv_followed_by_a_pointwise_conv(encoder):
    """The weight-space delta equals peft's conv-LoRA: p x p conv to r channels, then 1 x 1 conv back."""
    conv = encoder.clip.visual.conv1
    lora.apply_lora(encoder.clip, rank=RANK)
    _randomise_adapters(encoder.clip)
    delta = conv.parametrizations.weight[0]
    a, b = delta.lora_A[0], delta.lora_B[0]
    k = conv.kernel_size
    x = torch.randn(2, 3, 64, 64)
    low_rank = F.conv2d(F.conv2d(x, a.reshape(RANK, 3, *k), stride=conv.stride), b[:, :, None, None]) * delta.scale
    torch.testing.assert_close(F.conv2d(x, delta.delta(), stride=conv.stride), low_rank, rtol=1e-4, atol=1e-5)


def test_adapter_scale_is_alpha_over_rank(encoder):
    lora.apply_lora(encoder.clip, rank=16, alpha=1.0)
    assert encoder.clip.visual.conv1.parametrizations.weight[0].scale == pytest.approx(1 / 16)


def test_applying_twice_is_refused(encoder):
    lora.apply_lora(encoder.clip, rank=RANK)
    with pytest.raises(ValueError, match="already"):
        lora.apply_lora(encoder.clip, rank=RANK)
