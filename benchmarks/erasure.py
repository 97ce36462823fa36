"""The concept eraser (``train --method erase``, ``--then-erase``) against the issue's bars, beside the oracle and floors.

SYNTHETIC data and the ``tiny`` architecture: the figures compare the eraser with the models it edits and with
their yardsticks on this data; they are not comparable with any paper's numbers.

    .venv/bin/python benchmarks/erasure.py [--from runs/unlearning] [--workdir runs/erasure] [--seeds 0 1 2]
        [--forget graffiti] [--jobs 2]

Takes the models of ``benchmarks/unlearning.py`` (run it first): the base, the HySAC model, the oracle (the base
retrained without the concept's pairs) and each unlearning method's model at each seed, from ``--from``. Three
disjoint sets, as a check of "the concept is gone from the features" needs:

- the eraser is **fitted** on the train split of a dataset of its own (``data synth --n 1200 --seed 2 --boost
  CONCEPTS --boost-n 150 --boost-split train``): the demo training data holds 44 images of a concept, fewer than
  the 128 dimensions of the features, which ``erasure.plan`` refuses;
- the residue **probes are trained** on the train split of the fresh evaluation set of ``unlearning.py``
  (n 6000, seed 1; ``--probe-limit 960`` quadruplets);
- everything is **scored** on that fresh set's test split (148 graffiti images).

Rows: the base and the HySAC model with the eraser alone (image tower; for the base also image and text), and
``cliperase``, ``ac`` and ``hac`` with ``+ erase`` at each seed. ``eval unlearning`` (``--floors`` at the first
seed) compares them with the base, the oracle (Euclidean rows) and the HySAC model (Lorentz rows); ``eval``
(retrieval, geodesic traversal) gives T->V R@1, the distance-to-origin ordering and the traversal gain of each
model before and after its eraser. Writes ``benchmarks/results/erasure.json`` and prints the bars the issue sets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from unlearning import Bench, with_ci  # the same runner: two jobs at a time, logs, timings

from training.eval import retrieval as ev

OUT = Path(__file__).parent / "results" / "erasure.json"
METHODS = ("cliperase", "ac", "hac")
FIT_N, FIT_SEED, FIT_BOOST = 1200, 2, 150
#: the issue's bars, as the printed table names them (checked by ``bars``)
BARS = ("residue <= 55 (upper bound <= 60)", "residue_mlp <= oracle's + 5", "f_acc within the oracle's interval",
        "r_acc, r_recall drop <= 2", "T->V R@1 drop <= 1", "benign_drop_unseen <= 5", "r_probe within 2 of before")


def erased(path: Path) -> str:
    return f"{path.name}+erase"


def bars(row: dict, before: dict, oracle: dict | None, r1: tuple[float, float] | None) -> dict[str, bool | None]:
    """Each bar of the issue, checked on one erased row against the row of its model before the eraser."""
    def drop(metric: str) -> float | None:
        a, b = before.get(metric), row.get(metric)
        return None if a is None or b is None else a - b

    res, ci = row.get("residue"), (row.get("ci") or {}).get("residue")
    out: dict[str, bool | None] = {
        "residue": None if res is None or not ci else res <= 55 and ci[1] <= 60,
        "r_acc": None if drop("r_acc") is None else drop("r_acc") <= 2,
        "r_recall": None if drop("r_recall") is None else drop("r_recall") <= 2,
        "benign_unseen": None if row.get("benign_drop_unseen") is None else row["benign_drop_unseen"] <= 5,
        "r_probe": None if drop("r_probe") is None else abs(drop("r_probe")) <= 2,
        "T->V R@1": None if r1 is None else (r1[0] - r1[1]) * 100 <= 1,
    }
    if oracle is not None:
        o_ci = (oracle.get("ci") or {}).get("f_acc")
        out["residue_mlp"] = (None if row.get("residue_mlp") is None or oracle.get("residue_mlp") is None
                              else row["residue_mlp"] <= oracle["residue_mlp"] + 5)
        out["f_acc"] = None if not o_ci or row.get("f_acc") is None else o_ci[0] <= row["f_acc"] <= o_ci[1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", type=Path, default=Path("runs/unlearning"),
                    help="the workdir of benchmarks/unlearning.py (its models and data)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/erasure"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--forget", default="graffiti")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--probe-limit", type=int, default=960)
    args = ap.parse_args()
    src, work = args.source, args.workdir
    if not (src / "base").is_dir():
        sys.exit(f"{src} holds no models: run benchmarks/unlearning.py --workdir {src} first")
    bench = Bench(argparse.Namespace(workdir=work, source=src, jobs=args.jobs, probe_limit=args.probe_limit))
    work.mkdir(parents=True, exist_ok=True)
    fit = work / "fit"
    if not fit.exists():
        bench.step("fit data", "data", "synth", "--out", fit, "--n", FIT_N, "--seed", FIT_SEED, "--unsafe-look",
                   "generated", "--boost", args.forget, "--boost-n", FIT_BOOST, "--boost-split", "train")
    tag = args.forget.replace(",", "+")
    oracle = src / f"oracle-{tag}"
    models = {seed: {m: src / f"{tag}-seed{seed}" / m for m in METHODS} for seed in args.seeds}
    missing = [str(p) for ms in models.values() for p in ms.values() if not p.is_dir()] + \
        [str(p) for p in (bench.base, bench.hysac, oracle) if not p.is_dir()]
    if missing:
        sys.exit(f"missing models of benchmarks/unlearning.py: {', '.join(missing)}")

    def erase_job(model: Path, out: Path, *extra) -> tuple[str, tuple] | None:
        if out.exists():
            return None
        return (f"erase {out.relative_to(work)}", ("train", "--method", "erase", "--model", model, "--data", fit,
                                                    "--forget", args.forget, "--out", out, *extra))

    alone = {"base": work / "base+erase", "base-both": work / "base+erase-image-text", "hysac": work / "hysac+erase"}
    jobs = [erase_job(bench.base, alone["base"]), erase_job(bench.base, alone["base-both"], "--erase-towers", "image,text"),
            erase_job(bench.hysac, alone["hysac"])]
    for seed, ms in models.items():
        jobs += [erase_job(p, work / f"seed{seed}" / erased(p)) for p in ms.values()]
    bench.parallel([j for j in jobs if j])

    evaluations, retrieval = [], []
    for i, (seed, ms) in enumerate(models.items()):
        folder = work / f"seed{seed}"
        euclid = [*([alone["base"], alone["base-both"]] if i == 0 else []), ms["cliperase"],
                  folder / erased(ms["cliperase"]), ms["ac"], folder / erased(ms["ac"])]
        lorentz = [*([alone["hysac"]] if i == 0 else []), ms["hac"], folder / erased(ms["hac"])]
        for name, before, others in (("eval-euclidean", bench.base, [oracle, *euclid]),
                                     ("eval-lorentz", bench.hysac, lorentz)):
            job = bench.evaluation(folder, name, args.forget, before, others, floors=i == 0 and name == "eval-euclidean")
            evaluations += [job] if job else []
        if not (folder / "retrieval" / "report.json").exists():
            retrieval.append((f"seed{seed}/retrieval", ("eval", "--data", bench.fresh, "--split", "test", "--traversal",
                                                         "geodesic", "--out", folder / "retrieval", "--compare",
                                                         bench.base, bench.hysac, *euclid, *lorentz)))
    bench.parallel(evaluations + retrieval)

    rows, checks = [], []
    for i, (seed, ms) in enumerate(models.items()):
        folder = work / f"seed{seed}"
        table = {**json.loads((folder / "eval-euclidean" / "report.json").read_text()),
                 **json.loads((folder / "eval-lorentz" / "report.json").read_text())}
        retr = {m["label"]: m for m in json.loads((folder / "retrieval" / "report.json").read_text())["models"]}
        r1 = {label: m["variants"]["plain"]["tasks"][ev.T2V]["R@1"] for label, m in retr.items()}
        for key, metrics in table.items():
            rows.append({"seed": seed, "model": key, "T->V R@1": r1.get(key), **metrics,
                         "d0": retr.get(key, {}).get("d0")})
        pairs = [(bench.base.name, alone["base"].name), (bench.base.name, alone["base-both"].name),
                 (bench.hysac.name, alone["hysac"].name)] if i == 0 else []
        pairs += [(p.name, erased(p)) for p in ms.values()]
        for before, after in pairs:
            if before in table and after in table:
                ok = bars(table[after], table[before], table.get(oracle.name) if before != bench.hysac.name else None,
                          (r1.get(before), r1.get(after)) if before in r1 and after in r1 else None)
                checks.append({"seed": seed, "before": before, "after": after, "bars": ok})
    metrics = ("f_acc", "f_acc_bare", "r_acc", "r_recall", "residue", "residue_mlp", "r_probe", "benign_drop_unseen",
               "T->V R@1")
    lines = [f"forget {args.forget}, seed {args.seeds[0]}: value [95 % interval] (synthetic data)\n",
             "| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for r in [r for r in rows if r["seed"] == args.seeds[0]]:
        lines.append(f"| {r['model']} | " + " | ".join(
            (f"{100 * r[m]:.1f}" if r[m] is not None else "n/a") if m == "T->V R@1" else with_ci(r, m)
            for m in metrics) + " |")
    lines += ["\nmean ± std over seeds (rows present at every seed)\n", "| model | " + " | ".join(metrics) + " |",
              "|---" * (len(metrics) + 1) + "|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        got = [r for r in rows if r["model"] == model]
        if len(got) == len(args.seeds):
            cells = []
            for m in metrics:
                vals = [r[m] * (100 if m == "T->V R@1" else 1) for r in got if r.get(m) is not None]
                cells.append("n/a" if not vals else f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"
                             if len(vals) > 1 else f"{vals[0]:.1f}")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["\nthe issue's bars (" + "; ".join(BARS) + "): pass / fail / n/a\n"]
    for c in checks:
        lines.append(f"seed {c['seed']} {c['after']}: " + ", ".join(
            f"{k} {'pass' if v else 'n/a' if v is None else 'FAIL'}" for k, v in c["bars"].items()))
    print("\n".join(lines))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"synthetic": True, "forget": args.forget, "seeds": args.seeds, "rows": rows,
                               "bars": checks, "timings_s": bench.timings, "table": lines}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
