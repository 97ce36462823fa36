"""The kinds of admin job, side by side: what each checks before it starts, its steps (command lines of
``safe-retrieval``), and how its outcome is evaluated and judged (:class:`JobKind`, one per kind: ``KINDS``).

- **reindex**: one index step that stages a generation of the served index (or another);
- **retrain**: train from the served model, evaluate the served and the new model on the test split, then
  (optionally) reindex the served index with the new model;
- **forget**: unlearn concepts (optionally with the eraser), evaluate forgetting and retention before and after,
  then (optionally) reindex.

Every path is confined to the data roots (:mod:`service.admin.paths`); the facade (:mod:`service.admin`) plans a
job from its request with these and hands it to the runner.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from service.admin.acceptance import (
    RECALL_METRIC,
    RECALL_TASK,
    measured_number,
    retrieval_acceptance,
    unlearning_acceptance,
)
from service.admin.paths import confined, data_root_args, resolve_under_roots, source_args, store_args
from service.admin.plans import Plan
from service.errors import UnprocessableError
from service.jobs import INDEX_RESULT, JOB_DIR
from service.schemas import ForgetRequest, ReindexRequest, RetrainRequest
from training.errors import DataError, InputError
from training.methods import ERASE


# ------------------------------------------------------------------ reindex and retrain steps
def reindex_steps(req: ReindexRequest, *, model: Path, name: str, roots: list[Path], media_root: Path | None,
                  qdrant_url: str | None, index_root: Path, max_file_bytes: int | None = None,
                  takedowns: Path | None = None, storage: str | None = None) -> list[list[str]]:
    """The index step of a job: it stages a generation (``--no-switch``) and reports it (``--result-file``).

    ``storage`` (the service's ``INDEX_STORAGE``) becomes ``--storage``; unset, a build keeps the current generation's.

    ``takedowns`` (the collection's journal, ``service.collection.journal_path``) becomes ``--takedowns``: content on
    the takedown list is a failure of the job, never a point of the new generation.

    ``max_file_bytes`` (the service's ``JOB_MAX_FILE_BYTES``) becomes ``--max-file-bytes``: image files over
    it are failures of the job, refused from their size before they are read.

    An incremental job on a Qdrant server is refused: there ``index add`` changes the served
    collection in place, which no cancel could undo (see ``indexer.builder._check_stageable``).
    """
    if req.incremental and qdrant_url:
        raise InputError("an incremental reindex cannot be staged on a Qdrant server (adding changes the served "
                         "collection in place); submit it without 'incremental' to build a new generation")
    verb = "add" if req.incremental else "build"
    return [["index", verb, "--model", str(model), "--name", name,
             *source_args(req.source, roots, media_root), *store_args(qdrant_url=qdrant_url, index_root=index_root),
             *(["--max-file-bytes", str(max_file_bytes)] if max_file_bytes is not None else []),
             *(["--takedowns", str(takedowns)] if takedowns is not None else []),
             *(["--storage", storage] if storage is not None and not req.incremental else []),
             "--no-switch", "--result-file", INDEX_RESULT]]


def train_step(req: RetrainRequest, *, model: Path, out: Path, roots: list[Path]) -> list[str]:
    argv = ["train", "--method", req.method, "--data", str(resolve_under_roots(req.data, roots, what="data")),
            "--model", str(model), "--out", str(out), *data_root_args(roots)]
    options = {"--preset": req.preset, "--epochs": req.epochs, "--batch-size": req.batch_size, "--lr": req.lr,
               "--lora-rank": req.lora_rank, "--eta": req.eta, "--precision": req.precision, "--seed": req.seed,
               "--max-steps": req.max_steps}
    for flag, value in options.items():
        if value is not None:
            argv += [flag, str(value)]
    if req.full_finetune:
        argv.append("--full-finetune")
    return argv


# ------------------------------------------------------------------ forget jobs
#: where a forget job's evaluation writes report.json and report.md, in the job's folder
UNLEARNING = "unlearning"


def forget_data(requested: str | None, model: Path, roots: list[Path]) -> Path:
    """The dataset a forget job trains and evaluates on: the request's ``data``, else the served model's
    training data (its provenance ``data``), which must lie under the data roots as any job path."""
    if requested is not None:
        return resolve_under_roots(requested, roots, what="data")
    from training.artifact import read_config

    known = (read_config(model).get("provenance") or {}).get("data")
    if not isinstance(known, str) or not known:
        raise UnprocessableError("the served model records no training data (its provenance has no 'data'); give `data`: "
                                 "the ViSU-layout dataset, under the data roots, whose pairs show the concepts")
    try:
        return resolve_under_roots(known, roots, what="the served model's training data")
    except InputError as e:
        raise UnprocessableError(f"{e}; give `data`: a copy of that dataset (or another one) under the data roots") from e


def forget_concepts(data: Path, names: list[str], roots: list[Path]) -> list[str]:
    """The concepts that ``names`` (concept names or tags, any case) stand for in the dataset at ``data``.

    The request is checked as the job's training step will check it (:func:`training.data.forget.split`
    on the train split), so it fails here, before any job starts: a name the dataset does not know (the
    message lists its concepts and tags), a concept no training pair shows, or nothing left to retain
    is an UnprocessableError (422). Nothing outside the data roots is read.
    """
    from training.data import concepts, forget, visu

    allowed = confined(roots)
    summary = data / concepts.DATASET_SUMMARY
    if summary.exists():
        allowed.check(summary, what=f"{data.name}/{concepts.DATASET_SUMMARY}")
    records = visu.load_split(data, "train", roots=allowed).records
    try:
        return list(forget.split(records, data, forget=names, roots=allowed).concepts)
    except InputError as e:
        raise UnprocessableError(str(e)) from e


def check_forget_method(req: ForgetRequest, model: Path) -> None:
    """The method, its ``weights`` and ``options`` checked as training will check them (422 with the reason): a
    method whose geometry is ``lorentz`` (``hac``) needs a lorentz model, and the others name the methods that fit."""
    from training import methods
    from training.artifact import read_config

    if req.method == ERASE:
        extra = [k for k in ("preset", "epochs", "lr", "max_steps", "weights", "options") if getattr(req, k) is not None]
        if extra:
            raise UnprocessableError(f"method 'erase' fits a closed-form eraser and trains nothing, so it takes no "
                                     f"{', '.join(map(repr, extra))}; leave them out, or pick a method that trains")
        return
    geometry = read_config(model).get("geometry")
    if methods.METHODS[req.method].geometry == "lorentz" and geometry != "lorentz":
        usable = [m for m in methods.FORGETTING if methods.METHODS[m].geometry != "lorentz"]
        raise UnprocessableError(f"method {req.method!r} needs a lorentz (hyperbolic) model, and the served model is "
                                 f"{geometry}; use a method for any model: {', '.join(map(repr, usable))}")
    try:
        methods.term_weights(req.method, params=req.weights, options=req.options)
    except InputError as e:
        raise UnprocessableError(str(e)) from e


def _test_split(data: Path, roots: list[Path], why: str):
    """The test split of ``data``, which the job's evaluation step reads; none is a 422 saying ``why``."""
    from training.data import visu

    try:
        return visu.load_split(data, "test", roots=confined(roots))
    except (DataError, InputError) as e:
        raise UnprocessableError(f"the job's evaluation could not run, so {why}: {e}. Give `data` whose test split "
                                 "(its ViSU-Text test file and images, under the data roots) is there") from e


def check_erasable(req: ForgetRequest, model: Path, data: Path, concepts: list[str], roots: list[Path]) -> None:
    """Refuse (422), before anything is trained, a forget job whose eraser could not be fitted: too few train images
    of a concept (the message says how many it needs). Nothing to check without the eraser."""
    from training import erasure
    from training.artifact import read_config

    if not (req.erase or req.method == ERASE):
        return
    try:
        erasure.plan(data, concepts, dim=int(read_config(model)["embed_dim"]), roots=confined(roots))
    except (DataError, InputError) as e:
        raise UnprocessableError(f"{e}; or ask for no eraser (`erase`: false)") from e


def check_forget_evaluation(data: Path, concepts: list[str], roots: list[Path]) -> None:
    """Refuse (422), before anything is trained, a forget job whose evaluation could not measure the model: no
    test split, one that shows none of ``concepts`` (forgetting unmeasured), or nothing else (retention unmeasured).

    The same rules as the evaluation's own (``eval --unlearning``), on the same split.
    """
    from training.data.concepts import catalogue

    records = _test_split(data, roots, "the new model could not be checked").records
    cat = catalogue(data, records, roots=confined(roots))
    shown = [cat.concept_of(r) for r in records]
    forgotten = sum(1 for c in shown if c is not None and c.name in concepts)
    retained = sum(1 for c in shown if c is not None and c.name not in concepts)
    if not forgotten:
        raise UnprocessableError(f"the test split of {data.name} shows none of {', '.join(concepts)}, so the job's "
                                 "evaluation could not measure what the new model forgot; give `data` whose test split "
                                 f"shows them, or forget concepts it shows ({cat.known()})")
    if not retained:
        raise UnprocessableError(f"every test record of {data.name} with a known concept shows {', '.join(concepts)}, "
                                 "so the job's evaluation could not measure what the new model retained; forget fewer "
                                 "concepts, or give `data` whose test split also shows others")


def check_retrain_evaluation(data: Path, roots: list[Path]) -> None:
    """Refuse (422), before anything is trained, a retrain whose evaluation (the test split of ``data``) cannot run,
    or would read an image outside the data roots: ``eval`` reads every record of the split and, unlike the
    unlearning evaluation, takes no ``--data-root``, so the split is confined here."""
    split = _test_split(data, roots, "the new model's retrieval could not be checked")
    outside = split.skipped.get("outside_data_roots", 0)
    if outside:
        raise UnprocessableError(f"{outside} record(s) of the test split of {data.name} name images outside the data "
                                 "roots, which the job's evaluation would read; move them under the data roots or give "
                                 "other `data`")


def forget_steps(req: ForgetRequest, *, concepts: list[str], model: Path, out: Path, data: Path,
                 roots: list[Path]) -> list[list[str]]:
    """A forget job's training and evaluation steps (its index step is ``reindex_steps``).

    ``train`` unlearns ``concepts`` from ``model`` into ``out``; ``eval --unlearning`` compares the
    two on the test split of ``data`` and writes ``report.json`` into the job's ``UNLEARNING`` folder.
    """
    forget = ",".join(concepts)
    train = ["train", "--method", req.method, "--model", str(model), "--forget", forget, "--data", str(data),
             "--out", str(out), *data_root_args(roots)]
    options = {"--preset": req.preset, "--epochs": req.epochs, "--lr": req.lr, "--seed": req.seed,
               "--max-steps": req.max_steps}
    for flag, value in options.items():
        if value is not None:
            train += [flag, str(value)]
    if req.weights:  # by name: the trainer checks them as the route did (training.methods.term_weights)
        train += ["--weights", ",".join(f"{name}={weight!r}" for name, weight in req.weights.items())]
    for name, choice in (req.options or {}).items():
        train += ["--objective-option", f"{name}={choice}"]
    if req.erase and req.method != ERASE:
        train.append("--then-erase")
    evaluate = ["eval", "--unlearning", "--forget", forget, "--data", str(data), "--split", "test",
                "--out", f"{JOB_DIR}/{UNLEARNING}", *data_root_args(roots), "--compare", str(model), str(out)]
    return [train, evaluate]


def unlearning_result(folder: Path, plan: Plan) -> dict[str, Any]:
    """A forget job's ``result["unlearning"]``: its evaluation's table (``report.json``: artifact directory name
    -> metrics) with the concepts, the method and the forget/retain sizes the new model's provenance records.

    Raises DataError when the evaluation left no readable report (the job then fails, changing nothing).
    """
    from training.artifact import read_config

    path = folder / UNLEARNING / "report.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"the forget job's evaluation wrote no readable {path.name} ({e.__class__.__name__}); "
                        "see the job's log, then submit the job again") from e
    if not isinstance(table, dict) or len(table) != 2:
        raise DataError(f"the forget job's {path.name} does not hold two rows (before, after); see the job's log")
    before, after = table  # in the order of --compare: the served model, then the new one
    info = plan.unlearning or {}
    assert plan.new_model is not None, "a forget job's plan names the model it trains"
    forgotten = (read_config(plan.new_model).get("provenance") or {}).get("forget") or {}
    return {
        "concepts": info.get("concepts"), "method": info.get("method"),
        "forget_pairs": forgotten.get("forget_pairs"), "retain_pairs": forgotten.get("retain_pairs"),
        "before": before, "after": after, "table": table, "report": str(folder / UNLEARNING / "report.md"),
    }


# ------------------------------------------------------------------ retrain evaluation
#: where a retrain's evaluation writes report.json and report.md, in the job's folder
RETRIEVAL = "retrieval"


def retrieval_eval_step(data: Path, *, model: Path, out: Path) -> list[str]:
    """A retrain's evaluation step: the served ``model`` and the new one (``out``) on the test split of ``data``,
    without traversal (T->V queries are safe captions), into the job's ``RETRIEVAL`` folder.

    ``eval`` takes no ``--data-root`` outside ``--unlearning``: the route confines the split itself
    (:func:`check_retrain_evaluation`) before the job starts.
    """
    return ["eval", "--data", str(data), "--split", "test", "--traversal", "off", "--out", f"{JOB_DIR}/{RETRIEVAL}",
            "--compare", str(model), str(out)]


def retrieval_result(folder: Path) -> dict[str, Any]:
    """A retrain's ``result["retrieval"]`` (without its acceptance): T->V R@1 (%) of the served model (``before``) and
    the new one (``after``) from its evaluation's ``report.json``; a figure the report lacks is None.

    Raises DataError when the evaluation left no readable report.
    """
    path = folder / RETRIEVAL / "report.json"
    try:
        report = json.loads(path.read_text())
        models = report["models"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"the retrain's evaluation wrote no readable {path.name} ({e.__class__.__name__}); "
                        "see the job's log, then submit the job again") from e
    if not isinstance(models, list) or len(models) != 2:
        raise DataError(f"the retrain's {path.name} does not hold two models (served, new); see the job's log")

    def recall(row: Any) -> float | None:
        try:
            value = measured_number(100 * row["variants"]["plain"]["tasks"][RECALL_TASK][RECALL_METRIC])
        except (KeyError, TypeError):
            return None
        return None if value is None else round(value, 2)

    return {"task": RECALL_TASK, "metric": RECALL_METRIC, "before": recall(models[0]), "after": recall(models[1]),
            "report": str(folder / RETRIEVAL / "report.md")}


# ------------------------------------------------------------------ the kinds
def _evaluation_notes(folder: Path) -> dict[str, str]:
    """Why the unlearning evaluation left a figure null (``null`` of its ``details.json``: metric -> why), when it
    says so; the acceptance works without it."""
    try:
        notes = json.loads((folder / UNLEARNING / "details.json").read_text()).get("null")
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in notes.items()} if isinstance(notes, dict) else {}


class JobKind:
    """One kind of job: its name and how what its evaluation step measured is judged (``evaluate``)."""

    name: ClassVar[str]
    #: the result key of its evaluation and acceptance (None: it has none)
    result_key: ClassVar[str | None] = None

    def evaluate(self, folder: Path, plan: Plan) -> dict[str, Any]:
        """``{result_key: measured, with its acceptance}`` from the job's folder; DataError without a report."""
        raise DataError(f"a {self.name} job has no evaluation to judge")


class Reindex(JobKind):
    name = "reindex"


class Retrain(JobKind):
    name = "retrain"
    result_key = "retrieval"

    def evaluate(self, folder: Path, plan: Plan) -> dict[str, Any]:
        assert plan.acceptance is not None, "a retrain is judged"
        measured = retrieval_result(folder)
        measured["acceptance"] = retrieval_acceptance(measured["before"], measured["after"],
                                                      force=plan.acceptance.force, **plan.acceptance.thresholds)
        return {self.result_key: measured}


class Forget(JobKind):
    name = "forget"
    result_key = "unlearning"

    def evaluate(self, folder: Path, plan: Plan) -> dict[str, Any]:
        assert plan.acceptance is not None, "a forget job is judged"
        measured = unlearning_result(folder, plan)
        table = measured["table"]
        measured["acceptance"] = unlearning_acceptance(
            table[measured["before"]], table[measured["after"]], force=plan.acceptance.force,
            notes=_evaluation_notes(folder), **plan.acceptance.thresholds)
        return {self.result_key: measured}


KINDS: dict[str, JobKind] = {kind.name: kind for kind in (Reindex(), Retrain(), Forget())}


def evaluation_result(kind: str, folder: Path, plan: Plan) -> dict[str, Any]:
    """What a job of ``kind`` measured, judged against its plan's acceptance (see :meth:`JobKind.evaluate`)."""
    job_kind = KINDS.get(kind)
    if job_kind is None:
        raise DataError(f"a {kind} job has no evaluation to judge")
    return job_kind.evaluate(folder, plan)
