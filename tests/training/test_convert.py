"""training.convert: released-weight layouts -> artifacts, checked against the HF / peft originals.

The references are real ``transformers`` CLIP models (with real ``peft`` LoRA for HySAC), built small
and random inside the tests and saved the way the released files are; nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from itertools import chain
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from training import architectures, artifact, convert
from training.embedding import embed_one
from training.encoder import SafetyEncoder
from training.errors import ArchitectureError, ArtifactError, CheckpointError, InputError

WIDTH, LAYERS, HEADS, IMAGE, PATCH, PROJ, CONTEXT, VOCAB = 64, 2, 4, 32, 8, 32, 77, 49408
# the same network described twice: as HF CLIP configs and as an open_clip model config
OPENCLIP_CFG = {
    "embed_dim": PROJ,
    "quick_gelu": True,
    "vision_cfg": {"image_size": IMAGE, "layers": LAYERS, "width": WIDTH, "head_width": WIDTH // HEADS, "patch_size": PATCH},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": WIDTH, "heads": HEADS, "layers": LAYERS},
}
HF_COMMON = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=PROJ)
LORA = dict(r=16, lora_alpha=1, target_modules=["k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding"],
            lora_dropout=0.1, bias="none")
# HySAC's learned scalars, all stored as logs; values far from the initialisation on purpose
SCALARS = {"curv": 1.7, "visual_alpha": 0.3, "textual_alpha": 0.45, "logit_scale": 30.0}
HYSAC_BOUNDS = {
    "S": {"up_95": 1.10, "low_05": 0.40, "avg": 0.80},
    "V": {"up_95": 1.60, "low_05": 0.90, "avg": 1.20},
    "U": {"up_95": 2.20, "low_05": 1.30, "avg": 1.75},
    "G": {"up_95": 2.70, "low_05": 1.80, "avg": 2.30},
}
TEXTS = ["a photo of a cat", "two dogs playing in the snow near a red car", "x"]
ATOL = 1e-4


def text_config() -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=VOCAB, max_position_embeddings=CONTEXT, **HF_COMMON)


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(image_size=IMAGE, patch_size=PATCH, **HF_COMMON)


def exp_map0(v: torch.Tensor, c: float) -> torch.Tensor:
    """The Lorentz exp map at the origin, written out here so the reference does not reuse our module."""
    r = math.sqrt(c) * v.norm(dim=-1, keepdim=True)
    return torch.sinh(r) * v / r


class HySACLike(nn.Module):
    """The parameter layout of HySAC's module (``hysac/models.py``): peft towers plus log scalars."""

    def __init__(self, visual: nn.Module, textual: nn.Module):
        super().__init__()
        self.visual, self.textual = visual, textual
        for name, value in SCALARS.items():
            setattr(self, name, nn.Parameter(torch.tensor(math.log(value))))
        self.register_buffer("pixel_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @torch.no_grad()
    def text(self, ids: torch.Tensor) -> torch.Tensor:
        feats = self.textual(input_ids=ids).text_embeds
        return exp_map0(feats * self.textual_alpha.exp(), float(self.curv.exp()))

    @torch.no_grad()
    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.visual(pixel_values=pixels).image_embeds
        return exp_map0(feats * self.visual_alpha.exp(), float(self.curv.exp()))


@pytest.fixture(scope="module")
def arch_json(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("arch") / "clip-small-quickgelu.json"
    path.write_text(json.dumps(OPENCLIP_CFG))
    return str(path)


@pytest.fixture(scope="module")
def hysac(tmp_path_factory) -> SimpleNamespace:
    """A random HySAC-layout model saved as both peft key layouts, plus its bounds file."""
    torch.manual_seed(0)
    visual = get_peft_model(CLIPVisionModelWithProjection(vision_config()), LoraConfig(**LORA))
    textual = get_peft_model(CLIPTextModelWithProjection(text_config()), LoraConfig(**LORA))
    with torch.no_grad():  # peft starts B at zero; random B makes the merge change the outputs
        for name, p in chain(visual.named_parameters(), textual.named_parameters()):
            if "lora_B" in name:
                p.normal_(0.0, 1.0)
    module = HySACLike(visual, textual).eval()
    root = tmp_path_factory.mktemp("hysac")
    state = module.state_dict()
    assert any(".base_layer." in k for k in state) and any("patch_embedding.lora_A" in k for k in state)
    torch.save(state, root / "hysac_model.pth")
    # peft 0.4 kept base weights under the layer's own name; transformers 4.31 also saved position_ids
    old = {k.replace(".base_layer.", "."): v for k, v in state.items()}
    old["visual.base_model.model.vision_model.embeddings.position_ids"] = torch.arange((IMAGE // PATCH) ** 2 + 1)[None]
    old["textual.base_model.model.text_model.embeddings.position_ids"] = torch.arange(CONTEXT)[None]
    torch.save(old, root / "hysac_model_peft04.pth")
    (root / "hysac_bounds.json").write_text(json.dumps(HYSAC_BOUNDS))
    return SimpleNamespace(module=module, state=state, root=root,
                           files={"peft>=0.7": "hysac_model.pth", "peft0.4": "hysac_model_peft04.pth"})


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory) -> SimpleNamespace:
    """A random HF ``CLIPModel`` saved with ``save_pretrained`` (safetensors + config.json)."""
    torch.manual_seed(1)
    config = CLIPConfig(text_config=text_config().to_dict(), vision_config=vision_config().to_dict(), projection_dim=PROJ)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(42.0))
    root = tmp_path_factory.mktemp("hfclip")
    model.save_pretrained(root / "safeclip")
    return SimpleNamespace(model=model, root=root, dir=root / "safeclip")


def pixels(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- HySAC
@pytest.mark.parametrize("layout", ["peft>=0.7", "peft0.4"])
def test_hysac_conversion_matches_hf_peft_model(hysac, arch_json, tmp_path, layout):
    art = convert.convert("hysac", str(hysac.root / hysac.files[layout]), tmp_path / "art", arch=arch_json)
    enc = art.encoder
    assert art.geometry == "lorentz"
    assert art.curvature == pytest.approx(SCALARS["curv"], rel=1e-6)
    assert float(enc.textual_alpha.detach().exp()) == pytest.approx(SCALARS["textual_alpha"], rel=1e-6)
    assert float(enc.logit_scale.detach().exp()) == pytest.approx(SCALARS["logit_scale"], rel=1e-6)

    tokens = enc.tokenize(TEXTS)
    ours_text = enc.encode_text(TEXTS)
    ref_text = hysac.module.text(tokens.long())
    torch.testing.assert_close(ours_text, ref_text, atol=ATOL, rtol=0)

    px = pixels()
    ours_image = enc.encode_image(px)
    torch.testing.assert_close(ours_image, hysac.module.image(px), atol=ATOL, rtol=0)

    # the LoRA merge is what makes these agree: the base weights alone give other features
    with hysac.module.textual.disable_adapter(), hysac.module.visual.disable_adapter():
        base_text, base_image = hysac.module.text(tokens.long()), hysac.module.image(px)
    assert (ours_text - base_text).abs().max() > 100 * ATOL
    assert (ours_image - base_image).abs().max() > 100 * ATOL
    assert art.provenance["format"] == "hysac"
    assert art.provenance["lora"] == {"merged_modules": 2 * 5 * LAYERS + 1, "rank": [16], "alpha": 1.0}


def test_released_vit_l14_layouts_map_onto_the_default_architecture():
    """Full-size HySAC (ViT-L/14 + LoRA) and Safe-CLIP layouts, shapes only (meta tensors), against
    ``ViT-L-14-quickgelu``: every tensor finds its place with the right shape, nothing is left over."""
    common = dict(hidden_act="quick_gelu", projection_dim=768)
    tc = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, **common)
    vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=224, patch_size=14, **common)
    with torch.device("meta"):
        visual = get_peft_model(CLIPVisionModelWithProjection(vc), LoraConfig(**LORA))
        textual = get_peft_model(CLIPTextModelWithProjection(tc), LoraConfig(**LORA))
        safeclip = CLIPModel(CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(), projection_dim=768))
        expected = SafetyEncoder(architectures.resolve("ViT-L-14-quickgelu")).state_dict()
    raw = ({f"visual.{k}": v for k, v in visual.state_dict().items()}
           | {f"textual.{k}": v for k, v in textual.state_dict().items()})
    raw |= {name: torch.zeros(()) for name in SCALARS} | {"pixel_mean": torch.zeros(1, 3, 1, 1)}
    clip, head, leftover, info = convert.hysac_to_openclip(raw)
    hysac_state = {f"clip.{k}": v for k, v in clip.items()} | head
    clip, rest = convert.hf_to_openclip(safeclip.state_dict())
    safeclip_state = {f"clip.{k}": v for k, v in clip.items()}
    assert leftover == {} and rest == {}
    assert info["merged_modules"] == (12 + 24) * 5 + 1
    scalars = {k: expected[k] for k in ("curv", "visual_alpha", "textual_alpha", "logit_scale")}
    for state in (hysac_state, safeclip_state | scalars):
        assert set(state) == set(expected)
        assert all(tuple(state[k].shape) == tuple(expected[k].shape) for k in expected)


def test_merge_lora_equals_peft_merge_and_unload(hysac):
    """Our merge of every LoRA factor, conv patch embedding included, against peft's own merge."""
    prefix = "base_model.model."
    for tower in (hysac.module.visual, hysac.module.textual):
        state = {k[len(prefix):]: v for k, v in tower.state_dict().items()}
        merged, info = convert.merge_lora(state, lora_alpha=1.0)
        expected = copy.deepcopy(tower).merge_and_unload().state_dict()
        assert set(merged) == set(expected)
        for key in expected:
            torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=0, msg=key)
        assert info["merged_modules"] > 0


def test_lora_alpha_sets_the_merge_scale():
    a, b, w = torch.randn(4, 6), torch.randn(5, 4), torch.randn(5, 6)
    conv_a, conv_b, conv_w = torch.randn(4, 3, 2, 2), torch.randn(7, 4, 1, 1), torch.randn(7, 3, 2, 2)
    state = {
        "fc.base_layer.weight": w, "fc.base_layer.bias": torch.zeros(5),
        "fc.lora_A.default.weight": a, "fc.lora_B.default.weight": b,
        "conv.weight": conv_w, "conv.lora_A.default.weight": conv_a, "conv.lora_B.default.weight": conv_b,
    }
    merged, info = convert.merge_lora(state, lora_alpha=8.0)
    assert set(merged) == {"fc.weight", "fc.bias", "conv.weight"}
    torch.testing.assert_close(merged["fc.weight"], w + (b @ a) * 8.0 / 4)
    # a 1x1 conv B after conv A is the same as one conv with the composed kernel
    x = torch.randn(2, 3, 6, 6)
    composed = F.conv2d(F.conv2d(x, conv_a), conv_b) * 8.0 / 4 + F.conv2d(x, conv_w)
    torch.testing.assert_close(F.conv2d(x, merged["conv.weight"]), composed, atol=1e-5, rtol=1e-5)
    assert info == {"merged_modules": 2, "rank": [4], "alpha": 8.0}


def test_hysac_bounds_become_artifact_bounds_and_thresholds(hysac, arch_json, tmp_path):
    out = tmp_path / "art"
    convert.convert("hysac", str(hysac.root / "hysac_model.pth"), out, bounds=str(hysac.root / "hysac_bounds.json"),
                    arch=arch_json)
    art = artifact.load(out, device="cpu")  # through disk: fingerprint verified, bounds read back
    for cls, stats in HYSAC_BOUNDS.items():
        assert art.bounds[cls] == {"p95": stats["up_95"], "p05": stats["low_05"], "mean": stats["avg"]}
    c = SCALARS["curv"]
    for modality, cls in (("text", "S"), ("image", "V")):
        ub = HYSAC_BOUNDS[cls]["up_95"]
        assert art.unsafe_threshold(modality) == pytest.approx(ub + math.tanh((ub - 0.8) / c) + 1, rel=1e-6)
    assert art.provenance["bounds_source"].endswith("hysac_bounds.json")
    record = art.provenance["files"][0]
    assert record["name"] == "hysac_model.pth" and len(record["sha256"]) == 64


def test_bounds_mapping_rules():
    got = convert.bounds_from_hysac({"S": {"up_95": 1, "median": 0.5, "note": "x"}, "V": {"avg": [0.7]}, "extra": {"up_95": 9}})
    assert got == {"S": {"p95": 1.0, "p50": 0.5}, "V": {"mean": 0.7}}
    with pytest.raises(InputError, match="S.up_95"):
        convert.bounds_from_hysac({"S": {"up_95": "high"}})
    with pytest.raises(InputError, match="none of the classes"):
        convert.bounds_from_hysac({"X": {"up_95": 1.0}})


# ---------------------------------------------------------------------------- HF CLIP (Safe-CLIP)
def hf_features(model: CLIPModel, ids=None, px=None) -> torch.Tensor:
    with torch.no_grad():
        if ids is not None:
            return F.normalize(model.text_projection(model.text_model(input_ids=ids).pooler_output), dim=-1)
        return F.normalize(model.visual_projection(model.vision_model(pixel_values=px).pooler_output), dim=-1)


def test_hf_clip_conversion_matches_clipmodel(hf_clip, arch_json, tmp_path):
    art = convert.convert("hf-clip", str(hf_clip.dir), tmp_path / "art", arch=arch_json)
    enc = art.encoder
    assert art.geometry == "euclidean" and art.bounds == {}
    assert float(enc.logit_scale.detach().exp()) == pytest.approx(42.0, rel=1e-6)
    assert float(enc.clip.logit_scale.detach().exp()) == pytest.approx(42.0, rel=1e-6)
    ids = enc.tokenize(TEXTS).long()
    torch.testing.assert_close(enc.encode_text(TEXTS), hf_features(hf_clip.model, ids=ids), atol=ATOL, rtol=0)
    px = pixels(seed=3)
    torch.testing.assert_close(enc.encode_image(px), hf_features(hf_clip.model, px=px), atol=ATOL, rtol=0)

    # the same weights as a pickled state dict convert to the same tensors
    torch.save(hf_clip.model.state_dict(), tmp_path / "pytorch_model.bin")
    again = convert.convert("hf-clip", str(tmp_path / "pytorch_model.bin"), tmp_path / "art2", arch=arch_json)
    a, b = enc.state_dict(), again.encoder.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    # and so does a sharded save (an index.json naming the shard of every tensor)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    state = hf_clip.model.state_dict()
    shards = {name: {k: v.contiguous() for k, v in state.items() if (k.startswith("text_") == (i == 0))}
              for i, name in enumerate(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])}
    for name, part in shards.items():
        save_file(part, str(sharded / name))
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    third = convert.convert("hf-clip", str(sharded), tmp_path / "art3", arch=arch_json)
    c = third.encoder.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert [f["name"] for f in third.provenance["files"]] == sorted(shards)


def test_hf_clip_activation_must_match_architecture(hf_clip, tmp_path):
    gelu = dict(OPENCLIP_CFG, quick_gelu=False)
    cfg = tmp_path / "clip-small-gelu.json"
    cfg.write_text(json.dumps(gelu))
    with pytest.raises(ArchitectureError, match="QuickGELU"):
        convert.convert("hf-clip", str(hf_clip.dir), tmp_path / "art", arch=str(cfg))
    assert not (tmp_path / "art").exists()


# ---------------------------------------------------------------------------- open_clip
def test_openclip_local_files_round_trip(arch_json, tmp_path):
    torch.manual_seed(2)
    clip = architectures.build_clip(architectures.resolve(arch_json)).eval()
    state = clip.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "open_clip_model.safetensors"))
    # an open_clip training checkpoint: wrapped, saved from DDP
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "epoch_3.pt")

    tokens = architectures.build_tokenizer(architectures.resolve(arch_json))(TEXTS)
    with torch.no_grad():
        expected_text = F.normalize(clip.encode_text(tokens), dim=-1)
    for i, source in enumerate([tmp_path, tmp_path / "epoch_3.pt"]):  # a directory finds its weights file
        art = convert.convert("openclip", str(source), tmp_path / f"art{i}", arch=arch_json)
        got = art.encoder.clip.state_dict()
        assert all(torch.equal(got[k], state[k]) for k in state)
        torch.testing.assert_close(art.encoder.encode_text(TEXTS), expected_text, atol=1e-5, rtol=0)
        assert art.geometry == "euclidean"

    hyper = convert.convert("openclip", str(tmp_path / "epoch_3.pt"), tmp_path / "hyper", arch=arch_json, geometry="lorentz")
    assert hyper.geometry == "lorentz" and hyper.curvature == pytest.approx(1.0)
    assert "initialised lorentz head" in hyper.provenance["head"]


def test_openclip_tag_needs_network(arch_json, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying DNS
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match="network") as err:
        convert.convert("openclip", "openai", tmp_path / "art", arch="ViT-B-32")
    assert "--weights PATH" in str(err.value)
    with pytest.raises(CheckpointError, match="network"):
        convert.convert("hysac", "hf-hub:aimagelab/HySAC", tmp_path / "art", arch=arch_json)
    with pytest.raises(InputError, match="laion2b_s34b_b79k"):  # unknown tag: the valid ones are listed
        convert.convert("openclip", "opneai", tmp_path / "art", arch="ViT-B-32")


# ---------------------------------------------------------------------------- bad input
def test_missing_and_unexpected_keys_are_named(hysac, arch_json, tmp_path):
    state = dict(hysac.state)
    del state["textual.base_model.model.text_model.encoder.layers.1.self_attn.q_proj.weight"]
    state["visual.base_model.model.vision_model.extra_head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as err:
        convert.convert("hysac", str(tmp_path / "broken.pth"), tmp_path / "art", arch=arch_json)
    msg = str(err.value)
    assert "missing keys: clip.transformer.resblocks.1.attn.in_proj_weight" in msg
    assert "vision_model.extra_head.weight" in msg and "text_model.encoder.layers.1.self_attn.k_proj.weight" in msg
    assert "expected keys like" in msg
    assert not (tmp_path / "art").exists()


def test_wrong_format_is_named(hf_clip, arch_json, tmp_path):
    with pytest.raises(CheckpointError, match="--format hf-clip"):
        convert.convert("openclip", str(hf_clip.dir / "model.safetensors"), tmp_path / "art", arch=arch_json)


def test_wrong_architecture_shape_is_explained(hysac, tmp_path):
    cfg = tmp_path / "wider.json"
    cfg.write_text(json.dumps(dict(OPENCLIP_CFG, embed_dim=48)))
    with pytest.raises(CheckpointError, match="wrong shape"):
        convert.convert("hysac", str(hysac.root / "hysac_model.pth"), tmp_path / "art", arch=str(cfg))


def test_pth_given_as_artifact_says_convert(hysac):
    with pytest.raises(ArtifactError, match="model convert"):
        artifact.load(hysac.root / "hysac_model.pth", device="cpu")


def test_unknown_architecture_lists_names(hysac, tmp_path):
    with pytest.raises(ArchitectureError) as err:
        convert.convert("hysac", str(hysac.root / "hysac_model.pth"), tmp_path / "art", arch="ViT-L-14-quickgleu")
    assert "ViT-L-14-quickgelu" in str(err.value) and "tiny" in str(err.value)


class NotATensor:
    """Pickled by reference: weights_only loading must refuse it rather than import it."""


def test_unreadable_files_get_clear_errors(hf_clip, arch_json, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.pth is not a readable PyTorch checkpoint"):
        convert.convert("hysac", str(garbage), tmp_path / "a", arch=arch_json)

    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes((hf_clip.dir / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        convert.convert("hf-clip", str(truncated), tmp_path / "a", arch=arch_json)

    torch.save({"w": torch.zeros(1), "obj": NotATensor()}, tmp_path / "objects.pth")
    with pytest.raises(CheckpointError, match="besides tensors"):
        convert.convert("hysac", str(tmp_path / "objects.pth"), tmp_path / "a", arch=arch_json)

    with pytest.raises(InputError, match="weights not found"):
        convert.convert("hysac", str(tmp_path / "nope.pth"), tmp_path / "a", arch=arch_json)
    with pytest.raises(InputError, match="hysac_model.pth"):  # a directory without the expected file
        convert.convert("hysac", str(tmp_path), tmp_path / "a", arch=arch_json)
    with pytest.raises(InputError, match="not valid JSON"):
        garbage_json = tmp_path / "b.json"
        garbage_json.write_text("{")
        convert.convert("hysac", str(garbage), tmp_path / "a", arch=arch_json, bounds=str(garbage_json))
    with pytest.raises(InputError, match="euclidean|lorentz"):
        convert.convert("hf-clip", str(hf_clip.dir), tmp_path / "a", arch=arch_json, bounds=str(garbage_json))
    assert not (tmp_path / "a").exists()


def test_existing_output_is_not_overwritten(hysac, arch_json, tmp_path):
    (tmp_path / "art").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        convert.convert("hysac", str(hysac.root / "hysac_model.pth"), tmp_path / "art", arch=arch_json)


# ---------------------------------------------------------------------------- CLI, end to end
def cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("safe-retrieval")
    cmd = [str(exe), *args] if exe.exists() else [sys.executable, "-c", "from service.cli import main; main()", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_cli_convert_then_embed(hysac, arch_json, tmp_path):
    out = tmp_path / "hysac-art"
    done = cli("model", "convert", "--format", "hysac", "--weights", str(hysac.root / "hysac_model_peft04.pth"),
               "--bounds", str(hysac.root / "hysac_bounds.json"), "--arch", arch_json, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "sha256:" in done.stdout

    done = cli("embed", "--model", str(out), "--text", TEXTS[1], "--traverse", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["geometry"] == "lorentz" and report["curvature"] == pytest.approx(SCALARS["curv"], rel=1e-6)
    art = artifact.load(out, device="cpu")
    expected = hysac.module.text(art.encoder.tokenize([TEXTS[1]]).long())[0]
    torch.testing.assert_close(torch.tensor(report["vector"]), expected, atol=ATOL, rtol=0)
    # HySAC's bounds have no p50: a triggered text query lands at the safe-image mean instead
    d0 = report["distance_to_origin"]
    threshold = art.unsafe_threshold("text")
    assert report["unsafe"] is (d0 > threshold)
    moved = report["traversal"]
    assert moved["triggered"] is (d0 > threshold)
    landing = min(HYSAC_BOUNDS["V"]["avg"], threshold) if moved["triggered"] else d0
    assert moved["distance_to_origin_after"] == pytest.approx(landing, rel=1e-4)

    # images take the same path as the CLI's --image (open_clip preprocessing, then the encoder)
    image = tmp_path / "red.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(image)
    got = embed_one(art, image=image)
    expected = hysac.module.image(art.encoder.preprocess([Image.open(image)]))[0]
    torch.testing.assert_close(torch.tensor(got["vector"]), expected, atol=ATOL, rtol=0)
