"""Released weights -> artifacts: HySAC (HF CLIP + peft LoRA), Safe-CLIP (HF ``CLIPModel``), open_clip.

Three layouts come in, one goes out (an artifact whose ``model.safetensors`` is a plain
``SafetyEncoder`` state dict, LoRA merged):

- ``hysac``: ``hysac_model.pth``, the ``state_dict`` of HySAC's module. Its towers are HF
  ``CLIP{Vision,Text}ModelWithProjection`` wrapped by peft, so keys read
  ``visual.base_model.model.vision_model...`` / ``textual.base_model.model.text_model...``, with
  LoRA factors ``...<module>.lora_{A,B}.default.weight`` beside the base weight (``<module>.weight``
  as peft 0.4 saved it, ``<module>.base_layer.weight`` from peft 0.7 on). The scalars ``curv``,
  ``visual_alpha``, ``textual_alpha`` and ``logit_scale`` (all logs) become the encoder's head.
- ``hf-clip``: a HF ``CLIPModel`` state dict (``text_model.*``, ``vision_model.*``, projections,
  ``logit_scale``), e.g. Safe-CLIP. Same name mapping, no LoRA.
- ``openclip``: an open_clip state dict, or an open_clip pretrained tag fetched by open_clip.

Pickled files are read here and nowhere else, always with ``torch.load(weights_only=True)``, so a
checkpoint can hold tensors and plain containers but never code.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from open_clip import pretrained
from open_clip.model import CustomTextCLIP, convert_to_custom_text_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from training import artifact, traversal
from training.architectures import Architecture, from_config, resolve
from training.artifact import Artifact
from training.encoder import GEOMETRIES, SafetyEncoder
from training.errors import ArchitectureError, ArtifactError, CheckpointError, InputError, key_summary

FORMATS: tuple[str, ...] = ("hysac", "openclip", "hf-clip")
DEFAULT_GEOMETRY = {"hysac": "lorentz", "openclip": "euclidean", "hf-clip": "euclidean"}
HF_HUB_PREFIX = "hf-hub:"
# file names tried, in order, when a source is a directory or a bare hf-hub repo id
DEFAULT_FILES = {
    "hysac": ("hysac_model.pth",),
    "hf-clip": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    "openclip": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
}
BOUNDS_FILE = "hysac_bounds.json"
HYSAC_LORA_ALPHA = 1.0  # HySAC's LoraConfig(lora_alpha=1); the rank comes from the tensors
HYSAC_SCALARS = ("curv", "visual_alpha", "textual_alpha")
HYSAC_IGNORED = ("pixel_mean", "pixel_std")  # MERU leftovers, unused by HySAC
# HySAC's bounds statistics -> ours (our own names pass through unchanged)
BOUND_STATS = {"up_95": "p95", "low_05": "p05", "avg": "mean", "median": "p50",
               "p95": "p95", "p05": "p05", "p50": "p50", "mean": "mean"}
HASH_LIMIT = 8 << 30  # files above this are recorded by size only: hashing them is not cheap

_SAFETENSORS = ".safetensors"
_LORA = re.compile(r"^(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")
_HF_LAYER = re.compile(r"^(?P<tower>text|vision)_model\.encoder\.layers\.(?P<i>\d+)\.(?P<rest>.+)$")
_HF_QKV = re.compile(r"^self_attn\.(?P<which>[qkv])_proj\.(?P<kind>weight|bias)$")
_HF_LAYER_PARTS = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
_HF_TOWER = {"text": "transformer.resblocks", "vision": "visual.transformer.resblocks"}
_HF_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
# HF stores projections as nn.Linear weights (out, in); open_clip multiplies by (in, out) matrices
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_HYSAC_TOWERS = {
    "visual.": ("vision_model.", "visual_projection."),
    "textual.": ("text_model.", "text_projection."),
}
_PEFT_WRAPPER = "base_model.model."

State = dict[str, Tensor]


# ---------------------------------------------------------------------------- entry point
def convert(
    format: str,
    weights: str,
    out: str | Path,
    *,
    bounds: str | None = None,
    arch: str = "ViT-L-14-quickgelu",
    geometry: str | None = None,
    lora_alpha: float = HYSAC_LORA_ALPHA,
    overwrite: bool = False,
) -> Artifact:
    """Convert released weights into an artifact written to ``out``; returns the saved artifact.

    ``weights``: a local file or directory, ``hf-hub:ORG/REPO[/FILE]``, or (``openclip`` only) an
    open_clip pretrained tag such as ``openai``. ``bounds``: HySAC's ``hysac_bounds.json`` (lorentz
    only); the artifact's unsafe thresholds are derived from it. ``lora_alpha`` sets the LoRA scale
    ``lora_alpha / r`` (``r`` is read from the tensors).
    """
    if format not in FORMATS:
        raise InputError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    geometry = geometry or DEFAULT_GEOMETRY[format]
    if geometry not in GEOMETRIES:
        raise InputError(f"unknown geometry {geometry!r}; use one of {', '.join(GEOMETRIES)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another --out or remove it first")
    if bounds is not None and geometry != "lorentz":
        raise InputError("--bounds are distances to the origin of a hyperbolic model; drop them or use --geometry lorentz")
    architecture = resolve(arch)
    class_bounds = read_bounds(bounds) if bounds is not None else {}

    files, architecture = locate_weights(format, weights, architecture)
    raw = read_state(files)
    label = weights if len(files) == 1 and weights.startswith(HF_HUB_PREFIX) else str(files[0])
    _check_format(format, raw, label)
    if format == "hf-clip":
        _check_activation(files, architecture)

    clip_state, head, leftover, notes = to_openclip(format, raw, lora_alpha=lora_alpha)
    encoder = SafetyEncoder(architecture, geometry)
    state, notes["head"] = _encoder_state(encoder, clip_state, head, format)
    state.update(leftover)  # unmapped keys keep their names, so the error below can name them
    artifact.load_state(encoder, _fit_shapes(encoder, state), label)
    encoder.eval()

    safety = {}
    if class_bounds:
        safety = {"unsafe_threshold": traversal.thresholds_from_bounds(class_bounds, encoder.curvature)}
    prov = artifact.provenance(
        weights,
        format=format,
        arch=arch,
        files=[_file_record(f) for f in files],
        **({"bounds_source": bounds} if bounds is not None else {}),
        **notes,
    )
    art = artifact.Artifact(encoder, bounds=class_bounds, safety=safety, provenance=prov)
    artifact.save(art, out, overwrite=overwrite)
    return art


# ---------------------------------------------------------------------------- sources
def locate_weights(format: str, source: str, arch: Architecture) -> tuple[list[Path], Architecture]:
    """Resolve ``source`` to local files (downloading where needed).

    Returns the files (several for a sharded checkpoint) and the architecture, which an open_clip
    pretrained tag may adjust (QuickGELU, preprocessing) the way open_clip itself does.
    """
    if source.startswith(HF_HUB_PREFIX):
        return [hub_file(source, DEFAULT_FILES[format])], arch
    path = Path(source).expanduser()
    if path.is_dir():
        return _files_in_dir(path, DEFAULT_FILES[format]), arch
    if path.is_file():
        return [path], arch
    if format == "openclip" and _looks_like_tag(source):
        return _pretrained_tag(source, arch)
    raise InputError(f"weights not found: {source} (give a checkpoint file, a directory, or hf-hub:ORG/REPO/FILE)")


def hub_file(source: str, candidates: tuple[str, ...]) -> Path:
    """Download ``hf-hub:ORG/REPO[/FILE]`` (FILE defaults to the first of ``candidates`` present)."""
    parts = source[len(HF_HUB_PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise InputError(f"{source!r} is not a hub id; write hf-hub:ORG/REPO or hf-hub:ORG/REPO/FILE")
    repo, name = "/".join(parts[:2]), "/".join(parts[2:])
    # only for hf-hub: sources; a local conversion never loads the hub client
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    last: Exception | None = None
    for filename in (name,) if name else tuple(c for c in candidates if not c.endswith(".index.json")):
        try:
            return Path(hf_hub_download(repo, filename))
        except Exception as e:
            if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
                last = e  # the repo exists but lacks this file: try the next name
                continue
            # offline (not in the cache either), unknown or gated repo, HTTP errors
            raise CheckpointError(
                f"could not download {filename} from hf-hub:{repo} ({type(e).__name__}: {_first_line(e)}). "
                "This needs network access to huggingface.co (and 'hf auth login' for gated repos); "
                "offline, download the file elsewhere and pass its local path"
            ) from e
    raise CheckpointError(f"hf-hub:{repo} has none of {', '.join(candidates)}; name the file: hf-hub:{repo}/FILE") from last


def _files_in_dir(path: Path, candidates: tuple[str, ...]) -> list[Path]:
    for name in candidates:
        f = path / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):  # sharded HF checkpoint: the index maps tensors to shards
            try:
                shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{f} is not a valid shard index ({e}); re-download the checkpoint") from e
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"{path} lacks shards listed in {name}: {key_summary(missing)}")
            return [path / s for s in shards]
        return [f]
    raise InputError(f"{path} is a directory without any of {', '.join(candidates)}; pass the checkpoint file itself")


def _looks_like_tag(source: str) -> bool:
    return "/" not in source and "\\" not in source and Path(source).suffix not in (_SAFETENSORS, *artifact.PICKLE_SUFFIXES)


def _pretrained_tag(tag: str, arch: Architecture) -> tuple[list[Path], Architecture]:
    """Fetch an open_clip pretrained tag with open_clip's own downloader (cache first, then network)."""
    cfg = pretrained.get_pretrained_cfg(arch.name, tag)
    if not cfg:
        tags = pretrained.list_pretrained_tags_by_model(arch.name)
        known = f"tags for {arch.name}: {', '.join(tags)}" if tags else f"open_clip has no pretrained tags for {arch.name!r}"
        raise InputError(f"weights {tag!r} is neither a file nor an open_clip pretrained tag ({known})")
    try:
        target = pretrained.download_pretrained(cfg)
    except Exception as e:
        raise CheckpointError(
            f"could not download open_clip weights {arch.name}/{tag} ({type(e).__name__}: {_first_line(e)}). "
            "This needs network access; offline, download the weights elsewhere and pass the local file with --weights PATH"
        ) from e
    if not target:
        raise CheckpointError(f"open_clip has no download location for {arch.name}/{tag}; pass a local file with --weights PATH")
    model_cfg = dict(arch.model_cfg)
    if cfg.get("quick_gelu"):  # open_clip forces QuickGELU for OpenAI-lineage weights; so do we
        model_cfg["quick_gelu"] = True
    preprocess = dict(arch.preprocess)
    preprocess.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in preprocess and k != "size"})
    return [Path(target)], from_config(arch.name, model_cfg, preprocess)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no details"


# ---------------------------------------------------------------------------- reading
def read_state(files: list[Path]) -> State:
    """All tensors of one (possibly sharded) checkpoint, keyed by name."""
    state: State = {}
    for f in files:
        state.update(read_checkpoint(f))
    if not state:
        raise CheckpointError(f"{files[0]} holds no tensors; is it the right file?")
    return state


def read_checkpoint(path: Path) -> State:
    """Read a safetensors file, or a pickled state dict with ``torch.load(weights_only=True)``.

    Training checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) and
    DDP's ``module.`` prefix are unwrapped.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    # safetensors: 8-byte header length, then a JSON header
    if path.suffix == _SAFETENSORS or (len(head) == 9 and head[8:9] == b"{"):
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download it") from e
    obj = _torch_load(path)
    return _unwrap(obj, path)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise CheckpointError(
                f"{path} contains Python objects besides tensors ({_first_line(e)}); only plain state dicts "
                "are accepted because loading anything else would run code from the file. Re-save it with "
                "torch.save(model.state_dict(), PATH)"
            ) from e
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}); re-download it") from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, AttributeError, ImportError, IndexError) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)}); re-download it"
        ) from e


def _unwrap(obj: Any, path: Path) -> State:
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__}); pass a model checkpoint")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        names = key_summary([str(k) for k in not_tensors])
        raise CheckpointError(f"{path}: entries {names} are not tensors; pass a plain state dict")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _file_record(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    rec: dict[str, Any] = {"name": path.name, "bytes": size}
    if size <= HASH_LIMIT:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
        rec["sha256"] = h.hexdigest()
    return rec


def guess_format(keys: list[str] | set[str]) -> str | None:
    """Which of our formats a set of tensor names looks like (None if none)."""
    keys = list(keys)
    if any(k.startswith(("visual.base_model.", "textual.base_model.")) for k in keys) or "curv" in keys:
        return "hysac"
    if any(k.startswith(("text_model.", "vision_model.")) for k in keys):
        return "hf-clip"
    if any(k.startswith(("visual.conv1.", "visual.trunk.", "transformer.resblocks.", "text.")) for k in keys):
        return "openclip"
    return None


def _check_format(format: str, state: State, label: str) -> None:
    guessed = guess_format(state)
    if guessed and guessed != format:
        raise CheckpointError(
            f"{label} looks like a {guessed} checkpoint (keys like {key_summary(list(state), 3)}), "
            f"not {format}; pass --format {guessed}"
        )


def _check_activation(files: list[Path], arch: Architecture) -> None:
    """HF configs name their activation; a mismatch with the architecture gives subtly wrong features."""
    cfg_path = files[0].parent / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # no HF config beside the weights: nothing to check against
    acts = {cfg.get(t, {}).get("hidden_act") for t in ("text_config", "vision_config")} - {None}
    if not acts:
        return
    quick = bool(arch.model_cfg.get("quick_gelu", False))
    if (acts == {"quick_gelu"}) != quick:
        hint = (
            "an architecture without QuickGELU" if quick
            else "an architecture with QuickGELU (e.g. ViT-L-14-quickgelu, or \"quick_gelu\": true in the config)"
        )
        raise ArchitectureError(
            f"{cfg_path} uses activation {', '.join(sorted(acts))} but architecture {arch.name!r} "
            f"{'uses' if quick else 'does not use'} QuickGELU; pass {hint} with --arch"
        )


# ---------------------------------------------------------------------------- LoRA
def merge_lora(state: State, *, lora_alpha: float = HYSAC_LORA_ALPHA) -> tuple[State, dict[str, Any]]:
    """Fold peft LoRA factors into their base weights and drop them; peft's ``base_layer`` renamed away.

    Linear: ``W (out, in) += B (out, r) @ A (r, in) * lora_alpha / r``.
    Conv:   ``W (out, c, h, w) += einsum('or,rchw->ochw', B[:, :, 0, 0], A (r, c, h, w)) * lora_alpha / r``
    (B is a 1x1 conv, A has the base kernel). Factors without a partner or base stay in the result
    under their own names, so a strict load reports them.
    """
    out = dict(state)
    ranks: set[int] = set()
    merged = 0
    for key in sorted(state):
        m = _LORA.match(key)
        if not m:
            continue
        module, adapter = m["module"], m["adapter"]
        b_key = f"{module}.lora_B.{adapter}.weight"
        base_key = next((k for k in (f"{module}.base_layer.weight", f"{module}.weight") if k in state), None)
        if b_key not in state or base_key is None:
            continue
        a, b, w = state[key], state[b_key], state[base_key]
        r = a.shape[0]
        scale = lora_alpha / r
        work = torch.promote_types(w.dtype, torch.float32)
        if w.ndim == 2 and a.ndim == 2 and b.ndim == 2:
            delta = b.to(work) @ a.to(work)
        elif w.ndim == 4 and a.ndim == 4 and b.ndim == 4 and b.shape[2:] == (1, 1):
            delta = torch.einsum("or,rchw->ochw", b[:, :, 0, 0].to(work), a.to(work))
        else:
            raise CheckpointError(
                f"cannot merge LoRA into {base_key}: base {tuple(w.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)}; "
                "only linear layers and convolutions with a 1x1 B are supported"
            )
        if delta.shape != w.shape or b.shape[1] != r:
            raise CheckpointError(
                f"LoRA factors of {module} do not fit its weight: A {tuple(a.shape)}, B {tuple(b.shape)}, "
                f"weight {tuple(w.shape)}; the checkpoint is inconsistent"
            )
        out[base_key] = w.to(work) + delta * scale
        del out[key], out[b_key]
        ranks.add(r)
        merged += 1
    renamed: State = {}
    for key, value in out.items():
        new = key.replace(".base_layer.", ".")
        if new in renamed or (new != key and new in out):
            raise CheckpointError(f"both {key} and {new} are present; the checkpoint mixes peft layouts")
        renamed[new] = value
    info = {"merged_modules": merged, "rank": sorted(ranks), "alpha": lora_alpha}
    return renamed, info


# ---------------------------------------------------------------------------- name mapping
def hf_to_openclip(state: State) -> tuple[State, State]:
    """Rename a HF ``CLIPModel`` state dict to open_clip ``CLIP`` names.

    Returns ``(mapped, leftover)``: ``leftover`` holds what has no open_clip counterpart (unknown
    names, incomplete q/k/v triples) under the original names. ``position_ids`` buffers are dropped.
    q/k/v projections are concatenated in that order into ``attn.in_proj_{weight,bias}``;
    projections are transposed.
    """
    mapped: State = {}
    leftover: State = {}
    qkv: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in _HF_FIXED:
            mapped[_HF_FIXED[key]] = value
            continue
        if key in _HF_TRANSPOSED:
            mapped[_HF_TRANSPOSED[key]] = value.t().contiguous()
            continue
        m = _HF_LAYER.match(key)
        if m:
            prefix = f"{_HF_TOWER[m['tower']]}.{m['i']}."
            q = _HF_QKV.match(m["rest"])
            if q:
                qkv.setdefault((prefix, q["kind"]), {})[q["which"]] = (key, value)
                continue
            part = next((p for p in _HF_LAYER_PARTS if m["rest"].startswith(p)), None)
            if part is not None:
                mapped[prefix + _HF_LAYER_PARTS[part] + m["rest"][len(part):]] = value
                continue
        leftover[key] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            mapped[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts[w][1] for w in "qkv"], dim=0)
        else:
            leftover.update(dict(parts.values()))
    return mapped, leftover


def hysac_to_openclip(raw: State, *, lora_alpha: float = HYSAC_LORA_ALPHA) -> tuple[State, State, State, dict[str, Any]]:
    """HySAC module state dict -> ``(open_clip state, head scalars, leftover, lora info)``.

    Head scalars (logs, 0-d): ``curv``, ``visual_alpha``, ``textual_alpha``, ``logit_scale``.
    """
    hf: State = {}
    head: State = {}
    leftover: State = {}
    for key, value in raw.items():
        if key in HYSAC_SCALARS or key == "logit_scale":
            head[key] = value
            continue
        if key in HYSAC_IGNORED:
            continue
        tower = next((t for t in _HYSAC_TOWERS if key.startswith(t)), None)
        if tower is not None:
            inner = key[len(tower):]
            inner = inner[len(_PEFT_WRAPPER):] if inner.startswith(_PEFT_WRAPPER) else inner
            if inner.startswith(_HYSAC_TOWERS[tower]):
                hf[inner] = value
                continue
        leftover[key] = value
    merged, info = merge_lora(hf, lora_alpha=lora_alpha)
    mapped, rest = hf_to_openclip(merged)
    if "logit_scale" in head:
        mapped["logit_scale"] = head["logit_scale"]
    leftover.update(rest)
    return mapped, head, leftover, info


def to_openclip(format: str, raw: State, *, lora_alpha: float = HYSAC_LORA_ALPHA) -> tuple[State, State, State, dict[str, Any]]:
    """Any input layout -> ``(open_clip state, head scalars, leftover, notes for the provenance)``."""
    if format == "hysac":
        clip_state, head, leftover, lora = hysac_to_openclip(raw, lora_alpha=lora_alpha)
        return clip_state, head, leftover, {"lora": lora}
    if format == "hf-clip":
        clip_state, leftover = hf_to_openclip(raw)
        return clip_state, {}, leftover, {}
    return dict(raw), {}, {}, {}


def _encoder_state(encoder: SafetyEncoder, clip_state: State, head: State, format: str) -> tuple[State, str]:
    """open_clip tensors + head scalars -> ``SafetyEncoder`` names; says where the head came from."""
    if isinstance(encoder.clip, CustomTextCLIP):  # text tower lives under ``text.`` there
        clip_state = convert_to_custom_text_state_dict(clip_state)
    state: State = {f"clip.{k}": v for k, v in clip_state.items()}
    scale = head.get("logit_scale", clip_state.get("logit_scale"))
    if scale is not None:
        state["logit_scale"] = scale
    if encoder.geometry != "lorentz":
        return state, "euclidean (L2-normalised features)" + ("; HySAC curvature and alphas dropped" if head else "")
    if all(k in head for k in HYSAC_SCALARS):
        state.update({k: head[k] for k in HYSAC_SCALARS})
        return state, "hysac (trained curvature and alphas)"
    if format == "hysac":  # missing scalars: let the strict load name them
        state.update({k: head[k] for k in HYSAC_SCALARS if k in head})
        return state, "hysac (incomplete)"
    fresh = encoder.state_dict()
    state.update({k: fresh[k].clone() for k in HYSAC_SCALARS})
    c, alpha = encoder.curvature, math.exp(float(fresh["visual_alpha"]))
    return state, f"initialised lorentz head (curvature {c:g}, alpha {alpha:.4g}); untrained for safety"


def _fit_shapes(encoder: torch.nn.Module, state: State) -> State:
    """Reshape scalars saved as 1-element vectors (or the reverse) to what the model holds."""
    expected = encoder.state_dict()
    fixed = dict(state)
    for k, v in state.items():
        if k in expected and v.numel() == 1 and expected[k].numel() == 1 and v.shape != expected[k].shape:
            fixed[k] = v.reshape(expected[k].shape)
    return fixed


# ---------------------------------------------------------------------------- bounds
def read_bounds(source: str) -> dict[str, dict[str, float]]:
    """Read ``hysac_bounds.json`` (path or ``hf-hub:`` id) into our bounds layout."""
    path = hub_file(source, (BOUNDS_FILE,)) if source.startswith(HF_HUB_PREFIX) else Path(source).expanduser()
    if path.is_dir():
        path = path / BOUNDS_FILE
    if not path.is_file():
        raise InputError(f"bounds file not found: {path} (give HySAC's {BOUNDS_FILE})")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); give HySAC's {BOUNDS_FILE}") from e
    return bounds_from_hysac(obj, str(path))


def bounds_from_hysac(obj: Any, source: str = "bounds") -> dict[str, dict[str, float]]:
    """HySAC ``{"S": {"up_95", "low_05", "avg"}, ...}`` -> ours ``{"S": {"p95", "p05", "mean"}, ...}``.

    Classes other than S/V/U/G and unknown statistics are ignored; ``p50`` is kept only if given.
    """
    if not isinstance(obj, dict):
        raise InputError(f"{source} must be a JSON object with classes {', '.join(artifact.CLASSES)}")
    out: dict[str, dict[str, float]] = {}
    for cls in artifact.CLASSES:
        stats = obj.get(cls)
        if stats is None:
            continue
        if not isinstance(stats, dict):
            raise InputError(f"{source}: class {cls} must map statistics (up_95, low_05, avg) to numbers")
        row = {}
        for name, value in stats.items():
            if name in BOUND_STATS:
                row[BOUND_STATS[name]] = _number(value, f"{source}: {cls}.{name}")
        if row:
            out[cls] = row
    if not out:
        raise InputError(f"{source} has none of the classes {', '.join(artifact.CLASSES)} with up_95/low_05/avg")
    return out


def _number(value: Any, where: str) -> float:
    if isinstance(value, list) and len(value) == 1:  # a 1-element tensor dumped with .tolist()
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{where} is {value!r}; expected a finite number")
    return float(value)
