"""SafetyEncoder on the tiny preset: shapes, geometry heads, trimming, batching, bad input."""

import pytest
import torch
from PIL import Image

from training import architectures, lorentz
from training.encoder import SafetyEncoder
from training.errors import ArchitectureError, InputError


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return SafetyEncoder(architectures.resolve("tiny"), "lorentz")


def test_lorentz_head_lifts_onto_the_hyperboloid(tiny):
    x = tiny.encode_text(["a red ball on a table", "a dog"])
    assert x.shape == (2, tiny.arch.embed_dim) and x.dtype == torch.float32
    # the lift is exp_map0 of alpha-scaled features: distance to origin equals the tangent norm
    feats = tiny.text_features(tiny.tokenize(["a red ball on a table", "a dog"])).detach()
    v = feats * tiny.textual_alpha.detach().exp()
    assert torch.allclose(tiny.dist0(x), v.norm(dim=-1), rtol=1e-5)


def test_euclidean_head_is_unit_norm():
    enc = SafetyEncoder(architectures.resolve("tiny"), "euclidean")
    x = enc.encode_image([Image.new("RGB", (50, 70), "blue")])
    assert torch.allclose(x.norm(dim=-1), torch.ones(1))
    with pytest.raises(InputError):
        enc.dist0(x)


def test_text_trimming_matches_full_context(tiny):
    tokens = tiny.tokenize(["short", "a considerably longer caption with many more words in it"])
    with torch.no_grad():
        full = tiny.clip.encode_text(tokens)
        trimmed = tiny.text_features(tokens)
    assert torch.allclose(full, trimmed, atol=1e-5)


def test_batching_does_not_change_results(tiny):
    texts = [f"caption number {i}" for i in range(10)]
    assert torch.allclose(tiny.encode_text(texts, batch_size=3), tiny.encode_text(texts, batch_size=64), atol=1e-5)
    images = [Image.new("RGB", (64, 64), (i * 20, 0, 0)) for i in range(5)]
    a = tiny.encode_image(images, batch_size=2)
    b = tiny.encode_image(tiny.preprocess(images))
    assert torch.allclose(a, b, atol=1e-5)


def test_clamp_scalars_keeps_ranges(tiny):
    with torch.no_grad():
        tiny.curv.fill_(10.0)
        tiny.textual_alpha.fill_(3.0)
        tiny.logit_scale.fill_(0.0)
    tiny.clamp_scalars()
    assert 0.1 <= tiny.curvature <= 10.0 + 1e-5
    assert float(tiny.textual_alpha.detach()) <= 0.0
    assert float(tiny.logit_scale.exp()) >= 1 / 0.07 - 1e-4
    with torch.no_grad():
        tiny.curv.fill_(0.0)


def test_geometry_math_runs_in_fp32_under_autocast(tiny):
    tokens = tiny.tokenize(["a cat"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = tiny.embed_tokens(tokens)
    assert x.dtype == torch.float32
    assert torch.isfinite(lorentz.dist0(x, tiny.curvature)).all()


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_text_is_refused(tiny, bad):
    with pytest.raises(InputError, match="empty"):
        tiny.encode_text(["fine", bad])


def test_unknown_architecture_lists_valid_names():
    with pytest.raises(ArchitectureError) as e:
        architectures.resolve("ViT-Q-99")
    assert "tiny" in str(e.value) and "ViT-B-32" in str(e.value)


def test_architecture_from_config_file(tmp_path):
    cfg = tmp_path / "mini.json"
    cfg.write_text(
        '{"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},'
        ' "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}'
    )
    arch = architectures.resolve(str(cfg))
    assert arch.name == "mini" and arch.embed_dim == 16 and arch.preprocess["size"] == 32
    assert SafetyEncoder(arch).encode_text(["x"]).shape == (1, 16)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ArchitectureError, match="not valid JSON"):
        architectures.resolve(str(tmp_path / "broken.json"))
