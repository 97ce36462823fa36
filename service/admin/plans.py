"""A job's plan, typed: what its kind needs at its evaluation, its commit and its discard.

The runner (:mod:`service.jobs`) persists a plan as the dict :meth:`Plan.to_dict` gives and never reads it; the
admin side (:mod:`service.admin`), the service's commit (:mod:`service.state`) and the discard read it back with
:meth:`Plan.of`. Also here: the record of the served index's last indexed source (what a retrain reindexes by
default).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping


@dataclass
class Acceptance:
    """When and against what a job's new model is judged: once step ``after_step`` (its evaluation) has succeeded,
    against ``thresholds`` (the kind's: ``max_recall_drop``; ``min_forget_drop``, ``max_retain_drop``,
    ``max_benign_drop``); ``force``: a miss is recorded and the model swapped in anyway."""

    after_step: int
    force: bool = False
    thresholds: dict[str, float] = field(default_factory=dict)


@dataclass
class Plan:
    """What a job will make and what its commit does with it.

    ``index``: the index it stages a generation of (None: the served one); ``swap``: that is the served index,
    so the commit switches it and swaps the pair (with ``model``); ``new_model``: the artifact the job trains
    (deleted when the job does not succeed); ``served_model``: the model it started from; ``source``: the gallery
    it indexes (remembered once served); ``unlearning``: a forget job's concepts and method; ``acceptance``: when
    and how it is judged.
    """

    index: str | None = None
    swap: bool = False
    model: str | None = None
    new_model: str | None = None
    served_model: str | None = None
    source: dict[str, Any] | None = None
    unlearning: dict[str, Any] | None = None
    acceptance: Acceptance | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def delete_new_model(self) -> None:
        """Delete the unfinished artifact the job trained, and its run directory (checkpoints, metrics)."""
        if self.new_model:
            shutil.rmtree(self.new_model, ignore_errors=True)
            shutil.rmtree(f"{self.new_model}.run", ignore_errors=True)

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> "Plan":
        """The plan a job record holds (keys it does not know are ignored; records of older versions read too)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        spec = values.get("acceptance")
        if isinstance(spec, Mapping):
            values["acceptance"] = Acceptance(int(spec["after_step"]), bool(spec.get("force")),
                                              dict(spec.get("thresholds") or {}))
        return cls(**values)


SOURCE_RECORD = "source.json"


def read_source(state_dir: Path) -> dict[str, Any] | None:
    """The source of the served index's last successful build (what a retrain reindexes by default)."""
    try:
        return json.loads((Path(state_dir) / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return None


def write_source(state_dir: Path, source: dict[str, Any]) -> None:
    tmp = Path(state_dir) / f".{SOURCE_RECORD}.tmp"
    tmp.write_text(json.dumps(source, indent=2) + "\n")
    os.replace(tmp, Path(state_dir) / SOURCE_RECORD)
