"""Commands of the ground floor: ``data``, ``model`` and ``embed`` (mounted by ``service.cli``)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from training import methods
from training.errors import InputError

data_app = typer.Typer(help="Datasets: generate the synthetic ViSU-style benchmark.", no_args_is_help=True,
                       rich_markup_mode=None)  # literal help text: "[...]" is no markup
model_app = typer.Typer(help="Artifacts: create, convert and inspect encoders.", no_args_is_help=True,
                        rich_markup_mode=None)


class GeometryOpt(str, Enum):
    lorentz = "lorentz"
    euclidean = "euclidean"


class FormatOpt(str, Enum):
    hysac = "hysac"
    openclip = "openclip"
    hf_clip = "hf-clip"


def echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2))


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="Directory to write the dataset to (ViSU layout)."),
    n: int = typer.Option(2000, help="Quadruplets over train/validation/test (80/10/10); the heldout split re-captions test."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same files."),
    image_size: int = typer.Option(64, help="Side of the square images in pixels."),
    unsafe_look: str = typer.Option("plain", help="plain (the halves differ only in the object), generated "
                                    "(the unsafe half also gets a global look, as ViSU's generated images do) or "
                                    "generated-half (the caption word on half of the unsafe captions only)."),
    boost: Optional[str] = typer.Option(None, help="Concepts, comma-separated, that get --boost-n extra test "
                                        "quadruplets each (and their heldout re-captions), e.g. for a forget benchmark."),
    boost_n: Optional[int] = typer.Option(None, help="Extra test quadruplets per --boost concept (default 120)."),
    boost_split: str = typer.Option("test", help="Where the --boost records go: test (with heldout re-captions: enough "
                                    "test images to measure forgetting) or train (enough examples to fit an eraser on)."),
    holdout_lookalikes: bool = typer.Option(False, "--holdout-lookalikes", help="Each concept's train records never "
                                            "draw one of its safe counterparts (dataset.json: heldout_counterparts)."),
    multi: int = typer.Option(0, help="Write a 'multi' split of test scenes showing two concepts, one in a prop slot: "
                              "for each --boost concept (or each concept) K/2 (rounded up) as the main object and as "
                              "many in the slot, beside concepts not boosted. 0: none."),
) -> None:
    """Generate a deterministic synthetic ViSU-style dataset (safe/unsafe caption and image quadruplets)."""
    # loaded by the command that needs it: the CLI and --help start without torch
    from training.data import synthetic

    if (boost_n is not None or boost_split != "test") and boost is None:
        raise InputError("--boost-n and --boost-split shape a boost; name the concepts with --boost CONCEPTS")
    names = [x for x in (boost or "").split(",") if x.strip()]
    if boost is not None and not names:
        raise InputError(f"--boost takes concept names, comma-separated; the concepts are "
                         f"{', '.join(c.name for c in synthetic.CONCEPTS)}")
    summary = synthetic.generate(out, n=n, seed=seed, image_size=image_size, unsafe_look=unsafe_look, boost=names,
                                 boost_n=synthetic.BOOST_N if boost_n is None else boost_n,
                                 holdout_lookalikes=holdout_lookalikes, multi=multi, boost_split=boost_split)
    echo_json(summary)


@model_app.command("init")
def model_init(
    out: Path = typer.Option(..., help="Artifact directory to create."),
    arch: str = typer.Option("tiny", help="Preset or open_clip architecture name, or a model-config JSON file."),
    geometry: GeometryOpt = typer.Option(GeometryOpt.lorentz, help="lorentz (HySAC) or euclidean (Safe-CLIP)."),
    seed: int = typer.Option(0, help="Seed of the random initialisation."),
) -> None:
    """Create a freshly (randomly) initialised artifact."""
    # loaded by the command that needs it: the CLI and --help start without torch
    import torch

    from training import architectures, artifact
    from training.encoder import SafetyEncoder

    torch.manual_seed(seed)
    enc = SafetyEncoder(architectures.resolve(arch), geometry.value)
    art = artifact.Artifact(enc, provenance=artifact.provenance("init", arch=arch, seed=seed))
    artifact.save(art, out)
    typer.echo(f"wrote {out} ({art.fingerprint})")


@model_app.command("convert")
def model_convert(
    weights: str = typer.Option(..., help="Checkpoint path, hf-hub:ORG/REPO/FILE, or an open_clip pretrained tag (openclip)."),
    out: Path = typer.Option(..., help="Artifact directory to create."),
    format: FormatOpt = typer.Option(FormatOpt.hysac, "--format", help="Layout of the weights."),
    bounds: Optional[str] = typer.Option(None, help="HySAC bounds JSON (hysac_bounds.json), path or hf-hub id."),
    arch: str = typer.Option("ViT-L-14-quickgelu", help="open_clip architecture name or model-config JSON file."),
    geometry: Optional[GeometryOpt] = typer.Option(None, help="Default: lorentz for hysac, euclidean otherwise."),
) -> None:
    """Convert released weights (HySAC, Safe-CLIP, plain CLIP) into an artifact."""
    # loaded by the command that needs it: the CLI and --help start without torch
    from training import convert

    art = convert.convert(
        format.value, weights, out, bounds=bounds, arch=arch, geometry=geometry.value if geometry else None
    )
    typer.echo(f"wrote {out} ({art.fingerprint})")


@model_app.command("info")
def model_info(model: Path = typer.Argument(..., help="Artifact directory.")) -> None:
    """Print an artifact's config, fingerprint and bounds (without loading the weights)."""
    # loaded by the command that needs it: the CLI and --help start without torch
    from training import artifact

    cfg = artifact.read_config(model)
    bounds_path = model / artifact.BOUNDS
    cfg["bounds"] = json.loads(bounds_path.read_text()) if bounds_path.is_file() else {}
    cfg["architecture"] = {"name": cfg["architecture"]["name"], "embed_dim": cfg.get("embed_dim")}
    echo_json(cfg)


def embed(
    model: Path = typer.Option(..., help="Artifact directory."),
    text: Optional[str] = typer.Option(None, help="Text to embed."),
    image: Optional[Path] = typer.Option(None, help="Image file to embed."),
    traverse: bool = typer.Option(False, help="Apply safety traversal (lorentz models with bounds)."),
    target: str = typer.Option("image", help="Modality a traversed query will search: image or text."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
) -> None:
    """Embed one text or image and print JSON: geometry, curvature, vector, distance_to_origin, unsafe, traversal."""
    # loaded by the command that needs it: the CLI and --help start without torch
    from training import artifact
    from training.embedding import embed_one

    if (text is None) == (image is None):
        raise InputError("give exactly one of --text or --image")
    art = artifact.load(model, device=device)
    echo_json(embed_one(art, text=text, image=image, traverse=traverse, target=target))


class TraversalOpt(str, Enum):
    off = "off"
    hysac = "hysac"
    geodesic = "geodesic"


# ------------------------------------------------------------------------------------------------ eval
# `eval retrieval ...` and `eval unlearning ...`, and the form they grew out of: `eval --model X --data D ...`
# and `eval --unlearning --forget F ...` (the `evaluate` command below), which keeps working as it always did.
_DATA_HELP = "Dataset directory in the ViSU layout (real or synthetic)."
_MODEL_HELP = "Artifact directory to evaluate."
_COMPARE_HELP = "Evaluate every ARTIFACT argument into one table: --compare A B C."
_ARTIFACTS_HELP = "Artifacts to compare (with --compare)."
_SPLIT_HELP = "Split to evaluate: test, heldout, validation."
_TRAVERSAL_HELP = "Traversal for the extra rows of lorentz models; off for none."
_LIMIT_HELP = "Evaluate only the first N quadruplets (quick looks)."
_DEVICE_HELP = "auto, cpu, cuda, cuda:1, ..."
_FORGET_HELP = "The forgotten concepts or tags, comma-separated."
_IMAGEFOLDER_HELP = "Also (or, without --data, only) f_acc/r_acc on a folder of class subfolders (underscores read as spaces)."
_BENIGN_HELP = ("Benign classes, comma-separated, whose safe images benign_drop uses (default: the dataset's safe "
                "counterparts).")
_PROBE_LIMIT_HELP = "Fit the residue probes on at most N train quadruplets (a seeded sample)."
_SEED_HELP = "Seed of the residue probes' sample, the MLP probe, the random-init floor and the bootstrap intervals."
_ZERO_SHOT_HELP = ("Zero-shot prompts of f_acc/r_acc: 'prompt' (a photo of a {concept}), 'context' (each image's scene "
                   "captioned naming each class; synthetic data) or 'auto' (context where the dataset allows it). The "
                   "bare-prompt figures are reported beside them either way.")
_DATA_ROOT_HELP = ("Read data files only under this directory, after resolving symlinks (repeatable; none given: no "
                   "limit).")
_FLOORS_HELP = ("Add the rows 'floor: raw pixels' and 'floor: random init' after the artifacts: the residue probes on "
                "raw pixels and on a random-init copy of the first artifact's architecture.")


def _with_unlearning(text: str) -> str:
    """An unlearning option's help as the older form words it: ``--unlearning: ...``."""
    return f"--unlearning: {text[0].lower()}{text[1:]}"


def _eval_models(model: Optional[Path], compare: bool, artifacts: Optional[list[Path]]) -> list[Path]:
    """The artifacts named by --model and --compare A B C, checked for the forms that mix them up."""
    if artifacts and not compare:
        raise InputError(f"unexpected arguments {' '.join(map(str, artifacts))}; "
                         "to evaluate several artifacts use --compare A B C")
    if compare and not artifacts:
        raise InputError("--compare needs the artifacts to compare after it: --compare A B C")
    models = ([model] if model else []) + list(artifacts or [])
    if not models:
        raise InputError("give an artifact with --model, or several with --compare A B C")
    return models


def _eval_retrieval(models: list[Path], data: Optional[Path], out: Path, *, split: str, traversal: str, batch_size: int,
                    limit: Optional[int], device: str) -> None:
    if data is None:
        raise InputError("give the dataset to evaluate on with --data DIR")
    # loaded by the command that needs it: the CLI and --help start without torch
    from training.eval import retrieval

    report = retrieval.run(models, data, out, split=split, method=traversal, device=device, batch_size=batch_size,
                           limit=limit)
    typer.echo(retrieval.markdown(report))
    typer.echo(f"wrote {out / retrieval.REPORT}, {out / retrieval.MARKDOWN} and {len(report['plots'])} plots")


def _eval_unlearning(models: list[Path], data: Optional[Path], out: Path, *, forget: str, split: str,
                     imagefolder: Optional[Path], benign: Optional[str], probe_limit: Optional[int], seed: int,
                     zero_shot: str, data_root: list[Path], floors: bool, batch_size: int, device: str) -> None:
    # loaded by the command that needs it: the CLI and --help start without torch
    from training.eval import unlearning

    result = unlearning.run(models, out, forget=forget, data=data, split=split, imagefolder=imagefolder, benign=benign,
                            device=device, batch_size=batch_size, seed=seed, probe_limit=probe_limit,
                            zero_shot=zero_shot, data_roots=[str(p) for p in data_root], floors=floors)
    typer.echo(unlearning.markdown(result))
    typer.echo(f"wrote {out / unlearning.REPORT}, {out / unlearning.DETAILS}, {out / unlearning.MARKDOWN} and "
               f"{out / unlearning.PLOT}")


def evaluate(
    data: Optional[Path] = typer.Option(None, help=_DATA_HELP),
    out: Path = typer.Option(..., help="Report directory: report.json, report.md and PNG plots."),
    model: Optional[Path] = typer.Option(None, help=_MODEL_HELP),
    compare: bool = typer.Option(False, "--compare", help=_COMPARE_HELP),
    artifacts: Optional[list[Path]] = typer.Argument(None, help=_ARTIFACTS_HELP, show_default=False),
    split: str = typer.Option("test", help=_SPLIT_HELP),
    traversal: TraversalOpt = typer.Option(TraversalOpt.geodesic, help=_TRAVERSAL_HELP),
    batch_size: int = typer.Option(64, help="Encoding batch size."),
    limit: Optional[int] = typer.Option(None, help=_LIMIT_HELP),
    device: str = typer.Option("auto", help=_DEVICE_HELP),
    unlearning: bool = typer.Option(False, "--unlearning", help="Measure forgetting instead (with --forget), as "
                                    "`eval unlearning` does; the first --compare artifact is the before model."),
    forget: Optional[str] = typer.Option(None, help=_with_unlearning(_FORGET_HELP)),
    imagefolder: Optional[Path] = typer.Option(None, help=_with_unlearning(_IMAGEFOLDER_HELP)),
    benign: Optional[str] = typer.Option(None, help=_with_unlearning(_BENIGN_HELP)),
    probe_limit: Optional[int] = typer.Option(None, help=_with_unlearning(_PROBE_LIMIT_HELP)),
    seed: int = typer.Option(0, help=_with_unlearning(_SEED_HELP)),
    zero_shot: str = typer.Option("auto", help=_with_unlearning(_ZERO_SHOT_HELP)),
    data_root: List[Path] = typer.Option([], "--data-root", help=_with_unlearning(_DATA_ROOT_HELP)),
    floors: bool = typer.Option(False, "--floors", help=_with_unlearning(_FLOORS_HELP)),
) -> None:
    """Evaluate artifacts with the ViSU protocol (HySAC Tables 1-2, safety score, leakage) and write a report;
    with --unlearning --forget, measure how much of the concepts each artifact still knows."""
    if forget is not None and not unlearning:
        raise InputError("--forget belongs to the unlearning evaluation; add --unlearning")
    if unlearning and forget is None:
        raise InputError("--unlearning needs the forgotten concepts; add --forget CONCEPTS (names or tags, "
                         "comma-separated)")
    if not unlearning:
        for given, option in ((imagefolder, "--imagefolder"), (benign, "--benign"), (probe_limit, "--probe-limit"),
                              (None if zero_shot == "auto" else zero_shot, "--zero-shot"),
                              (data_root or None, "--data-root"), (floors or None, "--floors")):
            if given is not None:
                raise InputError(f"{option} belongs to the unlearning evaluation; add --unlearning --forget CONCEPTS")
    models = _eval_models(model, compare, artifacts)
    if unlearning:
        if limit is not None:
            raise InputError("--limit is not used with --unlearning (every record of the split is measured); drop it")
        _eval_unlearning(models, data, out, forget=forget or "", split=split, imagefolder=imagefolder, benign=benign,
                         probe_limit=probe_limit, seed=seed, zero_shot=zero_shot, data_root=data_root, floors=floors,
                         batch_size=batch_size, device=device)
        return
    _eval_retrieval(models, data, out, split=split, traversal=traversal.value, batch_size=batch_size, limit=limit,
                    device=device)


class _EvalToday(TyperCommand):
    """``evaluate`` reached through the ``eval`` group without a subcommand: it reads, and prints its usage and
    errors, as the command ``eval`` it used to be (its context takes the group's place)."""

    def make_context(self, info_name, args, parent=None, **extra):
        if parent is not None:
            info_name, parent = parent.info_name, parent.parent
        return super().make_context(info_name, args, parent=parent, **extra)


class _EvalGroup(TyperGroup):
    """``eval retrieval ...`` / ``eval unlearning ...``; anything else (``eval --model X --data D``, ``eval
    --unlearning --forget F ...``) goes to ``evaluate`` whole, as before the subcommands existed."""

    def resolve_command(self, ctx, args):
        if args and args[0] in self.commands:
            return super().resolve_command(ctx, args)
        today = typer.Typer(rich_markup_mode=None)
        today.command(cls=_EvalToday)(evaluate)
        return "eval", typer.main.get_command(today), args


eval_app = typer.Typer(
    cls=_EvalGroup, no_args_is_help=True, rich_markup_mode=None,
    context_settings={"ignore_unknown_options": True},  # today's options pass through to `evaluate`
    help="Evaluate artifacts: `eval retrieval` (the ViSU protocol: HySAC Tables 1-2, safety score, leakage) or `eval "
         "unlearning --forget CONCEPTS` (how much of the concepts each artifact still knows, and what forgetting "
         "cost). The older form still works: `eval --model X --data D ...` runs `eval retrieval`, `eval --unlearning "
         "--forget CONCEPTS ...` runs `eval unlearning`, with the same options.",
)


@eval_app.command("retrieval")
def eval_retrieval(
    data: Path = typer.Option(..., help=_DATA_HELP),
    out: Path = typer.Option(..., help="Report directory: report.json, report.md and PNG plots."),
    model: Optional[Path] = typer.Option(None, help=_MODEL_HELP),
    compare: bool = typer.Option(False, "--compare", help=_COMPARE_HELP),
    artifacts: Optional[list[Path]] = typer.Argument(None, help=_ARTIFACTS_HELP, show_default=False),
    split: str = typer.Option("test", help=_SPLIT_HELP),
    traversal: TraversalOpt = typer.Option(TraversalOpt.geodesic, help=_TRAVERSAL_HELP),
    batch_size: int = typer.Option(64, help="Encoding batch size."),
    limit: Optional[int] = typer.Option(None, help=_LIMIT_HELP),
    device: str = typer.Option("auto", help=_DEVICE_HELP),
) -> None:
    """Evaluate artifacts with the ViSU protocol (HySAC Tables 1-2, safety score, leakage) and write a report."""
    _eval_retrieval(_eval_models(model, compare, artifacts), data, out, split=split, traversal=traversal.value,
                    batch_size=batch_size, limit=limit, device=device)


@eval_app.command("unlearning")
def eval_unlearning(
    forget: str = typer.Option(..., help=_FORGET_HELP),
    out: Path = typer.Option(..., help="Report directory: report.json, details.json, report.md and a plot."),
    data: Optional[Path] = typer.Option(None, help=_DATA_HELP),
    model: Optional[Path] = typer.Option(None, help=_MODEL_HELP),
    compare: bool = typer.Option(False, "--compare", help=_COMPARE_HELP + " The first is the before model."),
    artifacts: Optional[list[Path]] = typer.Argument(None, help=_ARTIFACTS_HELP, show_default=False),
    split: str = typer.Option("test", help=_SPLIT_HELP),
    imagefolder: Optional[Path] = typer.Option(None, help=_IMAGEFOLDER_HELP),
    benign: Optional[str] = typer.Option(None, help=_BENIGN_HELP),
    probe_limit: Optional[int] = typer.Option(None, help=_PROBE_LIMIT_HELP),
    seed: int = typer.Option(0, help=_SEED_HELP),
    zero_shot: str = typer.Option("auto", help=_ZERO_SHOT_HELP),
    data_root: List[Path] = typer.Option([], "--data-root", help=_DATA_ROOT_HELP),
    floors: bool = typer.Option(False, "--floors", help=_FLOORS_HELP),
    batch_size: int = typer.Option(64, help="Encoding batch size."),
    device: str = typer.Option("auto", help=_DEVICE_HELP),
) -> None:
    """Measure how much of the forgotten concepts each artifact still knows, and what forgetting them cost: every
    figure with its 95 % interval (training/eval/unlearning.py's docstring defines them)."""
    _eval_unlearning(_eval_models(model, compare, artifacts), data, out, forget=forget, split=split,
                     imagefolder=imagefolder, benign=benign, probe_limit=probe_limit, seed=seed, zero_shot=zero_shot,
                     data_root=data_root, floors=floors, batch_size=batch_size, device=device)


def _train_and_erase(args: dict) -> None:
    """``train --method erase`` (the eraser alone) and ``train --method M --then-erase`` (M, then the eraser)."""
    from training import erasure
    from training.artifact import read_config
    from training.data import concepts
    from training.data.roots import DataRoots

    method, out = args["method"].value, Path(args["out"])
    if method != methods.ERASE and method not in methods.FORGETTING:
        raise InputError(f"--then-erase follows an unlearning method ({', '.join(methods.FORGETTING)}), not {method}; "
                         "to erase from an artifact as it is, use --method erase --model ARTIFACT")
    if not args["model"] or args["forget"] is None:
        raise InputError("the eraser needs the artifact to erase from and the concepts: --model ARTIFACT --forget CONCEPTS")
    if args["forget_manifest"] is not None:
        raise InputError("the eraser is fitted on the concepts of --data's records; --forget-manifest lists pairs, which "
                         "it cannot learn a concept from: name the concepts with --forget")
    if out.exists():
        raise InputError(f"{out} already exists; choose another --out or remove it first")
    towers = erasure.check_towers(args["erase_towers"].split(","))
    forget = concepts.parse_names(args["forget"])
    roots = DataRoots.of(args["data_root"] or None)
    dim = int(read_config(args["model"])["embed_dim"])
    erasure.plan(args["data"], forget, dim=dim, split=args["erase_split"], roots=roots)  # its errors before training
    kw = dict(towers=towers, split=args["erase_split"], roots=roots, batch_size=args["batch_size"] or 64,
              device=args["device"])
    if method == methods.ERASE:
        echo_json(erasure.erase(args["model"], args["data"], forget, out, **kw))
        return
    trained = out.with_name(f".{out.name}.before-erase")  # never where the final artifact is expected
    if trained.exists():
        raise InputError(f"{trained} is left from an interrupted --then-erase; remove it, then run the command again")
    run_dir = args["run_dir"] or out.with_name(out.name + ".run")
    train(**{**args, "then_erase": False, "out": trained, "run_dir": run_dir})
    echo_json(erasure.erase_after(trained, args["data"], forget, out, **kw))


#: every method of training.methods, as typer's choices
MethodOpt = Enum("MethodOpt", {name: name for name in (*methods.METHODS, methods.ERASE)}, type=str)


def _forget_methods_help() -> str:
    """Each unlearning method's terms (--weights order), named weights with defaults and options, from training.methods."""
    return "; ".join(methods.describe(name) for name in methods.FORGETTING)


class PrecisionOpt(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


def train(
    method: MethodOpt = typer.Option(
        MethodOpt("hysac"), help="hysac (hyperbolic), safeclip (Euclidean unlearning) or clip (baseline; with --clip-pairs all "
        "--forget, retrained without the concepts' pairs: the oracle); or forget a concept from --model with cliperase, "
        "ac, hac (Lorentz models), ga, graddiff or kl (with --forget); or erase: fit a closed-form concept eraser (LEACE) on "
        "--model's features of the --forget concepts and fold it into the encoder (no training)."),
    data: Path = typer.Option(..., help="ViSU-layout dataset directory (with --preset demo: created if missing)."),
    out: Path = typer.Option(..., help="Artifact directory to create (must not exist)."),
    model: Optional[str] = typer.Option(None, help="Start from: an artifact dir, a preset (tiny), an open_clip name "
                                                   "or a model-config JSON. Default tiny."),
    pretrained: Optional[str] = typer.Option(None, help="open_clip pretrained tag or weights file for an open_clip --model."),
    preset: Optional[str] = typer.Option(None, help="Sized for 2 CPU cores on synthetic data: demo-base (--method clip: a tiny "
                                         "CLIP on all pairs, the stand-in for pretrained CLIP), demo (fine-tunes --model)."),
    epochs: Optional[int] = typer.Option(
        None, help="Maximum epochs (default 50; demo-base 24; demo: hysac and clip 24, safeclip 16)."),
    batch_size: Optional[int] = typer.Option(None, help="Quadruplets per process and step (hysac/clip 32, safeclip 16)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (hysac/clip 1e-4, safeclip 1e-3)."),
    lora_rank: int = typer.Option(16, help="LoRA rank (alpha stays 1, as in the reference)."),
    full_finetune: Optional[bool] = typer.Option(None, "--full-finetune/--lora",
                                                 help="Train all weights instead of LoRA adapters."),
    eta: Optional[float] = typer.Option(None, help="hysac: weight of the entailment terms (default 1; demo 2)."),
    clip_pairs: Optional[str] = typer.Option(
        None, help="clip: 'safe' pairs only (the baseline, default) or 'all' (also unsafe pairs: a base model)."),
    weights: Optional[str] = typer.Option(
        None, help="Every loss term's weight, comma-separated, in the order of metrics.jsonl's terms; an unlearning "
        "method also takes its named weights, NAME=VALUE,... (the others keep their defaults; AC and HAC keep alpha = "
        "gamma unless --objective-option alpha_gamma=untied). hysac (7): contrastive_TI contrastive_T*I* "
        "contrastive_TI* contrastive_T*I entail_TI entail_T*I* entail_IT* (default 1,1,1,1,eta,eta,eta); safeclip (8): "
        "cd_S_Sref cd_U_Sref cd_V_Vref cd_G_Vref nce_S_Vref nce_U_Vref nce_Sref_V nce_Sref_G (default "
        "0.1,0.1,0.1,0.2,0.25,0.25,0.25,0.5); " + _forget_methods_help() + "."),
    forget: Optional[str] = typer.Option(
        None, help="Unlearning: concepts or tags to forget, comma-separated (the dataset's dataset.json concepts, its "
        "records' tags, or the tags of --forget-manifest); their pairs are the forget set, every other pair the retain set. "
        "With --method clip --clip-pairs all: the unsafe pairs left out of training (the retrain-without oracle)."),
    forget_manifest: Optional[Path] = typer.Option(
        None, help="Unlearning: a .csv/.jsonl with image and caption columns listing pairs to forget (also with --forget); "
        "an optional tags column makes its tags concepts: with --forget, a tagged row goes only when one of its tags is "
        "named."),
    objective_option: List[str] = typer.Option(
        [], "--objective-option", help="Unlearning: NAME=VALUE choices of the method (repeatable), listed with --weights: "
        "ac and hac take form=paper (the papers' equations, default) or form=ours (our earlier reconstruction, with its "
        "own terms, defaults and options)."),
    precision: Optional[PrecisionOpt] = typer.Option(None, help="fp32 or bf16 autocast (default: bf16 on CUDA, fp32 on CPU)."),
    grad_checkpointing: bool = typer.Option(False, help="Recompute transformer activations in backward to save memory."),
    resume: Optional[Path] = typer.Option(None, help="Run directory (OUT.run) or checkpoint directory to resume from."),
    seed: int = typer.Option(42, help="Seed of initialisation and data order."),
    gather_negatives: bool = typer.Option(False, help="Use every process's batch as negatives (multi-GPU)."),
    patience: Optional[int] = typer.Option(None, help="Stop after this many epochs without a better validation recall sum."),
    workers: Optional[int] = typer.Option(None, help="Data-loader worker processes per training process."),
    device: str = typer.Option("auto", help="auto, cpu, cuda (under torchrun each rank takes cuda:LOCAL_RANK)."),
    run_dir: Optional[Path] = typer.Option(None, help="Checkpoints and metrics.jsonl (default: OUT.run next to OUT)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps in total."),
    data_root: List[Path] = typer.Option([], "--data-root", help="Read data files only under this directory, after "
                                         "resolving symlinks (repeatable; none given: no limit)."),
    then_erase: bool = typer.Option(False, "--then-erase", help="After an unlearning method: also fit the concept eraser "
                                    "on the unlearned model and fold it in (what --method erase does), into --out."),
    erase_towers: str = typer.Option("image", help="--method erase / --then-erase: the towers to erase from, image "
                                     "and/or text, comma-separated."),
    erase_split: str = typer.Option("train", help="--method erase / --then-erase: the split of --data the eraser is "
                                    "fitted on."),
) -> None:
    """Fine-tune an encoder with HySAC, Safe-CLIP or plain CLIP, or make one forget a concept; write an artifact
    (multi-GPU: run under torchrun)."""
    if method.value == methods.ERASE or then_erase:
        _train_and_erase(locals())
        return
    # loaded by the command that needs it: the CLI and --help start without torch
    from training import recipes, trainer
    from training.data import concepts

    positional, named = methods.parse_weights(weights) if weights is not None else (None, None)
    cfg = recipes.TrainConfig(
        method=method.value, data=data, out=out, model=model, pretrained=pretrained, preset=preset, epochs=epochs,
        batch_size=batch_size, lr=lr, lora_rank=lora_rank, full_finetune=full_finetune, eta=eta, clip_pairs=clip_pairs,
        weights=positional, params=named,
        precision=precision.value if precision else None, grad_checkpointing=grad_checkpointing, resume=resume,
        seed=seed, gather_negatives=gather_negatives, patience=patience, workers=workers, device=device,
        run_dir=run_dir, max_steps=max_steps, data_roots=tuple(str(p) for p in data_root),
        forget=tuple(concepts.parse_names(forget)) if forget is not None else (), forget_manifest=forget_manifest,
        objective_options=tuple(objective_option),
    )
    result = trainer.train(cfg)
    if result.artifact is not None:
        echo_json(result.summary())
