"""Architectures as data: our presets (``presets/*.json``), open_clip's registry, or a config file.

An architecture is an open_clip *model config* (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...).
Artifacts store the full config, so a model loads without the registry it came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP

from training.errors import ArchitectureError

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Architecture:
    """A named open_clip model config and the preprocessing that goes with it."""

    name: str
    model_cfg: dict[str, Any]
    preprocess: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def context_length(self) -> int:
        return int(self.model_cfg.get("text_cfg", {}).get("context_length", 77))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def known_names() -> list[str]:
    return preset_names() + sorted(open_clip.list_models())


def _default_preprocess(model_cfg: dict[str, Any]) -> dict[str, Any]:
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    cfg = {
        "size": size,
        "mean": list(DEFAULT_MEAN),
        "std": list(DEFAULT_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    cfg.update({k: v for k, v in model_cfg.get("preprocess_cfg", {}).items() if k in cfg})
    return cfg


def resolve(name_or_path: str) -> Architecture:
    """Find an architecture by preset name, open_clip name, or path to a model-config JSON file."""
    path = Path(name_or_path)
    if name_or_path in preset_names():
        cfg = json.loads((PRESET_DIR / f"{name_or_path}.json").read_text())
        name = name_or_path
    elif name_or_path.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ArchitectureError(f"architecture config file not found: {path}")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ArchitectureError(f"{path} is not valid JSON ({e}); give an open_clip model config") from e
        cfg = cfg.get("model_cfg", cfg)
        name = path.stem
    elif name_or_path in open_clip.list_models():
        cfg = open_clip.get_model_config(name_or_path)
        name = name_or_path
    else:
        names = known_names()
        raise ArchitectureError(
            f"unknown architecture {name_or_path!r}. Valid names: {', '.join(names)}; "
            "or pass the path of an open_clip model-config JSON file"
        )
    return from_config(name, cfg)


def from_config(name: str, model_cfg: dict[str, Any], preprocess: dict[str, Any] | None = None) -> Architecture:
    """Validate a model config and attach its preprocessing."""
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise ArchitectureError(f"architecture {name!r} config lacks {key!r}; expected an open_clip model config")
    if "multimodal_cfg" in model_cfg:
        raise ArchitectureError(f"architecture {name!r} is a CoCa model; only contrastive CLIP models are supported")
    return Architecture(name, dict(model_cfg), preprocess or _default_preprocess(model_cfg))


def build_clip(arch: Architecture) -> CLIP | CustomTextCLIP:
    """A randomly initialised open_clip model for ``arch`` (weights are loaded separately)."""
    cfg = dict(arch.model_cfg)
    cfg.pop("preprocess_cfg", None)
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    cls = CustomTextCLIP if custom else CLIP
    try:
        return cls(**cfg, cast_dtype=None)
    except (TypeError, ValueError) as e:
        raise ArchitectureError(f"architecture {arch.name!r} cannot be built by open_clip: {e}; fix its config") from e


def build_tokenizer(arch: Architecture):
    """The tokenizer open_clip uses for ``arch`` (SimpleTokenizer unless the config names an HF one)."""
    text_cfg = arch.model_cfg["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=arch.context_length)
    return open_clip.tokenizer.SimpleTokenizer(context_length=arch.context_length, **text_cfg.get("tokenizer_kwargs", {}))


def build_transform(arch: Architecture):
    """open_clip's evaluation transform: resize (bicubic), centre crop, to tensor, CLIP mean/std."""
    p = arch.preprocess
    return open_clip.image_transform(
        p["size"], is_train=False, mean=tuple(p["mean"]), std=tuple(p["std"]),
        resize_mode=p["resize_mode"], interpolation=p["interpolation"],
    )


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None -> cuda when available, else cpu; anything else is taken as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
