"""Acceptance: a job's new model judged from what its evaluation measured, before anything is reindexed or swapped.

A retrain's T->V R@1 may fall at most ``max_recall_drop`` points; a forget job's model must forget (``f_acc`` falls
at least ``min_forget_drop``), keep (``r_acc`` falls at most ``max_retain_drop``) and spare look-alikes
(``benign_drop`` at most ``max_benign_drop``). A figure that could not be measured fails its check.
"""

from __future__ import annotations

from typing import Any, Mapping

#: the task and metric a retrain must keep: safe caption -> safe image, recall at 1
RECALL_TASK, RECALL_METRIC = "T->V", "R@1"
_EPS = 1e-6  # figures are rounded to 0.1: a fall of exactly the threshold passes


def measured_number(value: Any) -> float | None:
    """A measured figure, or None when it is missing, null, not a number or NaN (it could not be measured)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value)


def _unmeasured(what: str, metric: str, before: float | None, after: float | None, note: str | None) -> str:
    rows = " and ".join(name for name, v in (("the served model", before), ("the new model", after)) if v is None)
    return f"{what} could not be measured: the evaluation reports no {metric} for {rows}" + (f" ({note})" if note else "")


def unlearning_acceptance(before: Mapping[str, Any], after: Mapping[str, Any], *, min_forget_drop: float,
                          max_retain_drop: float, max_benign_drop: float, force: bool = False,
                          notes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Judge a forget job's new model from its evaluation's rows (``before``: the served model, ``after``: the new one).

    - forget: ``f_acc`` must fall by at least ``min(min_forget_drop, before f_acc)`` points (where the served model
      recognised less than the threshold, all of it must go);
    - retain: ``r_acc`` may fall by at most ``max_retain_drop`` points;
    - benign: ``after["benign_drop"]`` (points lost on harmless look-alikes) may be at most ``max_benign_drop``.

    A figure that is null (``notes``: metric -> why, from the evaluation) fails its check. Returns ``{"passed",
    "forced", "thresholds", "checks": {forget, retain, benign}, "misses"}``; ``forced`` when it failed and ``force``.
    """
    notes = notes or {}
    checks: dict[str, dict[str, Any]] = {}
    f0, f1 = measured_number(before.get("f_acc")), measured_number(after.get("f_acc"))
    required = min(min_forget_drop, f0) if f0 is not None else min_forget_drop
    forget: dict[str, Any] = {"metric": "f_acc", "before": f0, "after": f1, "required": required}
    if f0 is None or f1 is None:
        forget.update(drop=None, passed=False, reason=_unmeasured("forget accuracy", "f_acc", f0, f1, notes.get("f_acc")))
    else:
        drop = f0 - f1
        ok = drop >= required - _EPS
        all_of_it = f" (all of it: the served model recognised only {f0:.1f}%)" if required < min_forget_drop else ""
        moved = f"fell only {drop:.1f} points" if drop >= 0 else f"rose {-drop:.1f} points"
        forget.update(drop=round(drop, 2), passed=ok,
                      reason=None if ok else f"forget accuracy {moved} ({f0:.1f} -> {f1:.1f}), {required:g} required{all_of_it}")
    checks["forget"] = forget

    r0, r1 = measured_number(before.get("r_acc")), measured_number(after.get("r_acc"))
    retain: dict[str, Any] = {"metric": "r_acc", "before": r0, "after": r1, "allowed": max_retain_drop}
    if r0 is None or r1 is None:
        retain.update(drop=None, passed=False, reason=_unmeasured("retain accuracy", "r_acc", r0, r1, notes.get("r_acc")))
    else:
        drop = r0 - r1
        ok = drop <= max_retain_drop + _EPS
        retain.update(drop=round(drop, 2), passed=ok,
                      reason=None if ok else f"retain accuracy fell {drop:.1f} points, {max_retain_drop:g} allowed")
    checks["retain"] = retain

    b = measured_number(after.get("benign_drop"))
    benign: dict[str, Any] = {"metric": "benign_drop", "drop": b, "allowed": max_benign_drop}
    if b is None:
        why = notes.get("benign_drop")
        benign.update(passed=False, reason="look-alike accuracy could not be measured: the evaluation reports no "
                      "benign_drop for the new model" + (f" ({why})" if why else ""))
    else:
        ok = b <= max_benign_drop + _EPS
        benign.update(passed=ok, reason=None if ok else f"look-alike accuracy fell {b:.1f} points, {max_benign_drop:g} allowed")
    checks["benign"] = benign

    thresholds = {"min_forget_drop": min_forget_drop, "max_retain_drop": max_retain_drop, "max_benign_drop": max_benign_drop}
    return _verdict(checks, thresholds, force)


def retrieval_acceptance(before: float | None, after: float | None, *, max_recall_drop: float,
                         force: bool = False) -> dict[str, Any]:
    """Judge a retrain's new model: its T->V R@1 (%) may fall at most ``max_recall_drop`` points below the served
    model's on the same data; a figure that could not be measured fails. Returns what :func:`unlearning_acceptance` does."""
    name = f"{RECALL_TASK} {RECALL_METRIC}"
    check: dict[str, Any] = {"metric": name, "before": before, "after": after, "allowed": max_recall_drop}
    if before is None or after is None:
        check.update(drop=None, passed=False, reason=_unmeasured(name, name, before, after, None))
    else:
        drop = before - after
        ok = drop <= max_recall_drop + _EPS
        check.update(drop=round(drop, 2), passed=ok, reason=None if ok else
                     f"{name} fell {drop:.1f} points ({before:.1f} -> {after:.1f}), {max_recall_drop:g} allowed")
    return _verdict({"recall": check}, {"max_recall_drop": max_recall_drop}, force)


def _verdict(checks: dict[str, dict[str, Any]], thresholds: dict[str, float], force: bool) -> dict[str, Any]:
    misses = [c["reason"] for c in checks.values() if not c["passed"]]
    return {"passed": not misses, "forced": bool(misses) and force, "thresholds": thresholds, "checks": checks,
            "misses": misses}


def refused(result: dict[str, Any]) -> str | None:
    """The job's error when the acceptance in ``result`` failed and was not forced, else None."""
    for key, measured in result.items():
        acceptance = measured.get("acceptance") if isinstance(measured, dict) else None
        if acceptance and not acceptance["passed"] and not acceptance["forced"]:
            return (f"the new model was refused: {'; '.join(acceptance['misses'])}. Nothing was reindexed or swapped "
                    f"and the new model was deleted (result.{key} holds the evaluation and its acceptance); train it "
                    "differently or change the thresholds and submit again, or submit with force: true to swap it in "
                    "anyway")
    return None


def forced(result: dict[str, Any]) -> dict[str, Any] | None:
    """The acceptance in ``result`` that failed but was forced (the commit's audit record names it), else None."""
    for measured in result.values():
        acceptance = measured.get("acceptance") if isinstance(measured, dict) else None
        if acceptance and acceptance["forced"]:
            return acceptance
    return None
