"""Training recipes: what a run is configured with, and how a partial configuration is completed.

A :class:`TrainConfig` holds every option of a run; ``None`` in a field means "not given". A
configuration is completed, explicit values first, from

- a *recipe* (``recipes/<name>.json``, chosen with ``--preset NAME``): data, not code, like the
  architectures in ``presets/``. Its keys are ``TrainConfig`` fields plus ``description``,
  ``synthetic_n`` and ``synthetic_look`` (the synthetic dataset it is sized for, made when the data
  directory is missing), ``methods`` (the methods it trains, when not all), ``needs_model`` (it
  fine-tunes a base given as ``--model``) and ``by_method`` (per-method overrides);
- the method's defaults (:data:`METHOD_DEFAULTS`, the references' hyper-parameters).

The CLI flag and the ``TrainConfig`` field keep the name ``preset`` because checkpoints and
artifacts record the option under that name; everywhere else a training recipe is a "recipe" and a
"preset" is an architecture.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

from training import architectures, lora, methods, objectives
from training.errors import InputError

RECIPE_DIR = Path(__file__).parent / "recipes"
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("constant", "cosine")

# Reference hyper-parameters per method (HySAC: AdamW 1e-4, bs 32; Safe-CLIP: Adam 1e-3, bs 16).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "hysac": {"lr": 1e-4, "batch_size": 32, "epochs": 50},
    "safeclip": {"lr": 1e-3, "batch_size": 16, "epochs": 50},
    "clip": {"lr": 1e-4, "batch_size": 32, "epochs": 50},
    # unlearning: short fine-tunes from a trained model (CLIPErase: Adam 1e-6, batch 16, 20 epochs on CLIP ViT)
    "cliperase": {"lr": 1e-6, "batch_size": 16, "epochs": 20},
    "ac": {"lr": 1e-6, "batch_size": 16, "epochs": 10},
    "hac": {"lr": 1e-6, "batch_size": 16, "epochs": 10},
    "ga": {"lr": 1e-6, "batch_size": 16, "epochs": 5},
    "graddiff": {"lr": 1e-6, "batch_size": 16, "epochs": 5},
    "kl": {"lr": 1e-6, "batch_size": 16, "epochs": 5},
}
# Defaults of the fields that every method shares and a recipe may set.
SHARED_DEFAULTS: dict[str, Any] = {"model": "tiny", "full_finetune": False, "patience": 5, "workers": 2, "eta": 1.0,
                                   "clip_pairs": "safe"}
RECIPE_DATA_KEYS = ("synthetic_n", "synthetic_look")  # how the recipe's synthetic data is made, not training options
RECIPE_META_KEYS = ("description", "methods", "needs_model", "by_method", *RECIPE_DATA_KEYS)


@dataclass
class TrainConfig:
    """Everything a run depends on. ``None`` means "the method's (or recipe's) default"."""

    method: str = "hysac"
    data: Path | None = None
    out: Path | None = None
    model: str | None = None
    pretrained: str | None = None
    preset: str | None = None  # the recipe (recipes/<name>.json), named by --preset
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lora_rank: int = lora.DEFAULT_RANK
    lora_alpha: float = lora.DEFAULT_ALPHA
    full_finetune: bool | None = None
    eta: float | None = None  # hysac: weight of the entailment terms (1, or the recipe's)
    clip_pairs: str | None = None  # clip: "safe" (default) or "all", which also contrasts the unsafe pairs (a base)
    weights: tuple[float, ...] | None = None  # every loss term's weight, in the method's order (None: the reference's)
    params: dict[str, float] | None = None  # an unlearning method's named weights (alpha=0.5, ...), instead of weights
    weight_decay: float = 0.2
    precision: str | None = None
    grad_checkpointing: bool = False
    resume: Path | None = None
    seed: int = 42
    gather_negatives: bool = False
    patience: int | None = None
    workers: int | None = None
    device: str = "auto"
    run_dir: Path | None = None
    val_limit: int | None = 2000
    log_every: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps in total (smoke tests, benchmarks)
    warmup_steps: int = 0  # linear warm-up of the learning rate (the references use none)
    schedule: str = "constant"  # "constant" (the references) or "cosine" decay to 0 over all epochs
    cache_mb: int = 1024  # keep preprocessed training images in memory when they fit in this many MiB
    progress: bool = True
    data_roots: tuple[str, ...] = ()  # read files only under these directories (the service's jobs); () reads anywhere
    forget: tuple[str, ...] = ()  # unlearning: the concepts or tags to forget (clip --clip-pairs all: to leave out)
    forget_manifest: Path | None = None  # unlearning: a .csv/.jsonl of (image, caption) pairs to forget
    objective_options: tuple[str, ...] = ()  # unlearning: "name=value" choices of the method (e.g. norm=grow)


def load_recipes(directory: Path = RECIPE_DIR) -> dict[str, dict[str, Any]]:
    """Every ``<name>.json`` in ``directory``, by name; a key that is neither a field nor a recipe key is refused."""
    known = {f.name for f in fields(TrainConfig)} | set(RECIPE_META_KEYS)
    recipes = {}
    for path in sorted(directory.glob("*.json")):
        recipe = json.loads(path.read_text())
        unknown = {k for r in (recipe, *recipe.get("by_method", {}).values()) for k in r} - known
        if unknown:
            raise InputError(f"recipe {path} has unknown keys {', '.join(sorted(unknown))}; use TrainConfig's fields")
        recipes[path.stem] = recipe
    return recipes


RECIPES: dict[str, dict[str, Any]] = load_recipes()


def synthesize_for_recipe(recipe: str, out: Path, *, seed: int) -> dict[str, Any]:
    """Generate the synthetic dataset a recipe is sized for (its n and unsafe look) in ``out``; its summary."""
    # only when the data is missing: the generator is not needed otherwise
    from training.data import synthetic

    r = RECIPES[recipe]
    return synthetic.generate(out, n=r["synthetic_n"], seed=seed, unsafe_look=r["synthetic_look"])


def recipe_options(name: str, method: str, model: str | None) -> dict[str, Any]:
    """The ``TrainConfig`` values recipe ``name`` gives ``method``; an :class:`InputError` if it does not apply."""
    if name not in RECIPES:
        raise InputError(f"unknown preset {name!r}; use one of {', '.join(RECIPES)}")
    recipe = dict(RECIPES[name])
    recipe.update(recipe.pop("by_method", {}).get(method, {}))
    methods = recipe.get("methods")
    if methods is not None and method not in methods:
        raise InputError(f"--preset {name} trains --method {' or '.join(methods)}, not {method}")
    if recipe.get("needs_model", False) and model is None:
        raise InputError(
            f"--preset {name} fine-tunes a base model, as the papers fine-tune a pretrained CLIP; give it as "
            "--model: for example train one first with 'safe-retrieval train --method clip --preset demo-base "
            "--data DIR --out runs/demo-base', then pass --model runs/demo-base"
        )
    return {k: v for k, v in recipe.items() if k not in RECIPE_META_KEYS}


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill in recipe and method defaults and check the options; explicit values always win."""
    objectives.objective_class(cfg.method)  # unknown method -> InputError
    if (cfg.weights is not None or cfg.params is not None) and cfg.eta is not None:
        raise InputError("give --eta or --weights, not both: --weights also sets the three entailment terms' weights")
    recipe = recipe_options(cfg.preset, cfg.method, cfg.model) if cfg.preset is not None else {}
    defaults = {**METHOD_DEFAULTS[cfg.method], **SHARED_DEFAULTS}
    values = {}
    for f in fields(TrainConfig):
        current = getattr(cfg, f.name)
        if f.name in defaults:  # None means "not given": recipe, then method default
            values[f.name] = current if current is not None else recipe.get(f.name, defaults[f.name])
        elif f.name in recipe and current == f.default:  # other fields: the recipe replaces untouched defaults
            values[f.name] = recipe[f.name]
    cfg = replace(cfg, **values)
    if cfg.precision is None:
        cfg = replace(cfg, precision="bf16" if architectures.pick_device(cfg.device).type == "cuda" else "fp32")
    if cfg.precision not in PRECISIONS:
        raise InputError(f"unknown precision {cfg.precision!r}; use one of {', '.join(PRECISIONS)}")
    if cfg.data is None or cfg.out is None:
        raise InputError("give --data (a ViSU-layout dataset directory) and --out (the artifact directory to create)")
    checks = [
        (cfg.epochs >= 1, "--epochs must be >= 1"),
        (cfg.batch_size >= 2, "--batch-size must be >= 2 (contrastive losses need negatives)"),
        (cfg.lr > 0, "--lr must be > 0"),
        (cfg.lora_rank >= 1, "--lora-rank must be >= 1"),
        (cfg.patience >= 1, "--patience must be >= 1"),
        (cfg.workers >= 0, "--workers must be >= 0"),
        (cfg.eta >= 0, "--eta must be >= 0"),
        (cfg.schedule in SCHEDULES, "schedule must be constant or cosine"),
    ]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)
    check_forgetting(cfg)
    if cfg.weights is not None or cfg.params is not None:
        weights = check_weights(cfg.weights, cfg.method, params=cfg.params, options=options_dict(cfg))
        cfg = replace(cfg, weights=weights if cfg.weights is not None else None,
                      params={k: float(v) for k, v in cfg.params.items()} if cfg.params is not None else None)
    run_dir = cfg.run_dir or cfg.out.with_name(cfg.out.name + ".run")
    return replace(cfg, data=Path(cfg.data), out=Path(cfg.out), run_dir=Path(run_dir))


def check_forgetting(cfg: TrainConfig) -> None:
    """``--forget``/``--forget-manifest`` and ``--objective-option`` go with the unlearning methods, and only with them;
    ``--forget`` also goes with ``clip --clip-pairs all``, the retrain-without oracle."""
    forgetting = cfg.method in objectives.FORGETTING
    if forgetting and not cfg.forget and cfg.forget_manifest is None:
        raise InputError(f"--method {cfg.method} unlearns: name what to forget with --forget CONCEPTS (concept names or "
                         "tags, comma-separated) or --forget-manifest FILE")
    if cfg.method == "clip" and (cfg.forget or cfg.forget_manifest is not None):
        check_oracle(cfg)
    elif not forgetting and (cfg.forget or cfg.forget_manifest is not None):
        raise InputError(f"--forget and --forget-manifest go with an unlearning method ({', '.join(objectives.FORGETTING)}), "
                         f"not --method {cfg.method}; for example --method cliperase (or --method clip --clip-pairs all "
                         "--forget CONCEPTS: retrain without the concepts' pairs)")
    if not forgetting and cfg.objective_options:
        raise InputError(f"--objective-option goes with an unlearning method ({', '.join(objectives.FORGETTING)})")
    if forgetting and cfg.resume is None and not Path(str(cfg.model)).is_dir():
        raise InputError(f"--method {cfg.method} unlearns from a trained model: give --model ARTIFACT (a directory), "
                         f"not {cfg.model!r}")
    options = options_dict(cfg)
    if forgetting:
        methods.check_options(cfg.method, options)


def check_oracle(cfg: TrainConfig) -> None:
    """``clip --forget``: retraining without the forget pairs needs the pairs it would otherwise train on."""
    if cfg.forget_manifest is not None:
        raise InputError("--method clip --forget retrains without the unsafe pairs of the concepts' quadruplets; "
                         "--forget-manifest goes with an unlearning method (cliperase, ac, ...): drop it")
    if cfg.clip_pairs != "all":
        raise InputError("--method clip --clip-pairs safe never trains on the unsafe pairs, so --forget would change "
                         "nothing; add --clip-pairs all (retrain the base without the concepts' pairs: the oracle) or "
                         "drop --forget")


def options_dict(cfg: TrainConfig) -> dict[str, str]:
    """``--objective-option`` values as a dict; a malformed one is an :class:`InputError`."""
    out = {}
    for item in cfg.objective_options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InputError(f"--objective-option takes NAME=VALUE, like norm=grow; got {item!r}")
        out[key.strip()] = value.strip()
    return out


def check_weights(weights: Sequence[float] | None, method: str, *, params: dict[str, float] | None = None,
                  options: dict[str, str] | None = None) -> tuple[float, ...]:
    """The per-term weights ``--weights`` gives (one number per term, or an unlearning method's named weights), or an
    :class:`InputError` that names the method's terms in order (and its named weights)."""
    terms = objectives.objective_class(method).terms
    if len(terms) < 2:
        raise InputError(f"--weights applies to methods with several loss terms; {method} has a single loss term, "
                         "so drop it")
    if method in methods.FORGETTING:
        return methods.term_weights(method, weights=weights, params=params, options=options)
    if params is not None:
        raise InputError(f"named weights (NAME=VALUE) go with the unlearning methods ({', '.join(methods.FORGETTING)}); "
                         f"--weights for {method} takes {len(terms)} numbers, one per loss term in the order "
                         f"{' '.join(terms)}")
    assert weights is not None
    if len(weights) != len(terms) or any(not math.isfinite(w) or w < 0 for w in weights) or not sum(weights):
        raise InputError(
            f"--weights for {method} takes {len(terms)} non-negative numbers, not all zero, one per loss term in the "
            f"order {' '.join(terms)}; got {','.join(f'{w:g}' for w in weights)}. The reference's: "
            f"{','.join(f'{w:g}' for w in objectives.reference_weights(method))}"
        )
    return tuple(float(w) for w in weights)
