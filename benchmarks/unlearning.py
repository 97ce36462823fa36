"""Every unlearning method, one concept and two, three seeds, beside the oracle and the floors; AC/HAC weight sweeps.

SYNTHETIC data and the ``tiny`` architecture: the figures compare the methods with each other and with
their yardsticks on this data; they are not comparable with the papers' numbers.

    .venv/bin/python benchmarks/unlearning.py [--workdir runs/unlearning] [--seeds 0 1 2] [--jobs 2]
        [--forget graffiti --forget "graffiti,stolen cash"] [--methods cliperase ac hac ga graddiff kl]
        [--from DIR]   # reuse DIR/visu, DIR/fresh, DIR/base, DIR/hysac (the gate models: the same recipe)

Runs the real commands. Once:

- ``data synth`` of the demo recipe (n 1200, seed 0, ``--holdout-lookalikes``: one look-alike class of each
  concept never appears in that concept's training records, so the look-alikes split into classes the
  unlearning's twin rows showed and classes they did not);
- the evaluation set, a *fresh* dataset of the same generator (n 6000, seed 1) with ``--boost`` (120 more
  test quadruplets of each forgotten concept: at least 100 images each) and ``--multi`` (test images that
  show a forgotten concept and a retained one together);
- the base (``train --method clip --preset demo-base``) and the HySAC model ``hac`` forgets from;
- per forget set, the **oracle**: the base retrained from scratch on the same data without the forget
  pairs (``train --method clip --preset demo-base --forget ...``), the gold standard of unlearning.

Then for every forget set and seed (the unlearning run's seed: its data order), ``train --method M
--preset demo --model BASE --forget ... --seed S`` for each method (``hac`` from the HySAC model), and
``eval unlearning --compare BEFORE ORACLE AFTER...`` on the fresh test split (``--floors`` at the first
seed: the residue probes on raw pixels and on a random-init encoder). For the first forget set and seed,
the paper-style weight sweeps of ``ac`` (alpha = gamma 0.75, beta 0 / 0.25 / 0.5 / 0.75; beta 0.5, alpha =
gamma 0.5 / 0.75 / 1) and ``hac`` (the same with alpha = gamma 0.5 as the base row), and at every seed
of the first forget set the project's earlier variants (``form=ours``) beside the papers' forms.

Writes ``benchmarks/results/unlearning.json`` (every row's metrics with their 95 % bootstrap intervals,
and the timings) and prints the tables: mean ± standard deviation over the seeds, and the first seed's
figures with their intervals.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from train_eval import CLI  # the CLI of this checkout's venv (this folder is on sys.path)

from training.eval.unlearning import BETTER, METRICS

METHODS = ("cliperase", "ac", "hac", "ga", "graddiff", "kl")
OUT = Path(__file__).parent / "results" / "unlearning.json"
BOOST_N, MULTI_N, EVAL_N = 120, 120, 6000
#: (label, method, named weights, options): the paper-style sweeps, at the first forget set and seed
SWEEP = (
    *[(f"ac b{b}", "ac", f"alpha=0.75,gamma=0.75,beta={b}") for b in (0, 0.25, 0.75)],
    *[(f"ac a{a}", "ac", f"alpha={a},gamma={a},beta=0.5") for a in (0.5, 1)],
    *[(f"hac b{b}", "hac", f"alpha=0.5,gamma=0.5,beta={b}") for b in (0, 0.25, 0.75)],
    *[(f"hac a{a}", "hac", f"alpha={a},gamma={a},beta=0.5") for a in (0.75, 1)],
)
OURS = ("ac", "hac")  # methods whose earlier variant (form=ours) is measured beside the paper's form


def run(*args, log: Path) -> float:
    """One CLI command, its output in ``log``; one thread each (two run side by side); its wall time."""
    cmd = [CLI, *map(str, args)]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-4000:]}")
    return time.perf_counter() - t0


def fmt(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def with_ci(row: dict, metric: str) -> str:
    value, ci = row.get(metric), (row.get("ci") or {}).get(metric)
    if value is None:
        return "n/a"
    return f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci and None not in ci else f"{value:.1f}"


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.work: Path = args.workdir
        self.timings: dict[str, float] = {}
        src = args.source
        self.data = (src or self.work) / "visu"
        self.fresh = (src or self.work) / "fresh"
        self.base = (src or self.work) / "base"
        self.hysac = (src or self.work) / "hysac"

    def step(self, name: str, *args) -> None:
        self.timings[name] = round(run(*args, log=self.work / "logs" / f"{name.replace('/', '_')}.log"), 1)

    def parallel(self, jobs: list[tuple[str, tuple]]) -> None:
        with ThreadPoolExecutor(self.args.jobs) as pool:
            list(pool.map(lambda job: self.step(job[0], *job[1]), jobs))

    def prepare(self, forget_sets: list[str]) -> None:
        boosted = ",".join(sorted({c.strip() for f in forget_sets for c in f.split(",")}))
        if not self.data.exists():
            self.step("data", "data", "synth", "--out", self.data, "--n", 1200, "--seed", 0, "--unsafe-look",
                      "generated", "--holdout-lookalikes")
        if not self.fresh.exists():
            self.step("fresh data", "data", "synth", "--out", self.fresh, "--n", EVAL_N, "--seed", 1, "--unsafe-look",
                      "generated", "--holdout-lookalikes", "--boost", boosted, "--boost-n", BOOST_N, "--multi", MULTI_N)
        jobs = []
        if not self.base.exists():
            jobs.append(("base", ("train", "--method", "clip", "--preset", "demo-base", "--data", self.data,
                                  "--out", self.base)))
        for forget in forget_sets:
            oracle = self.oracle(forget)
            if not oracle.exists():
                jobs.append((f"oracle {forget}", ("train", "--method", "clip", "--preset", "demo-base", "--data",
                                                  self.data, "--forget", forget, "--out", oracle)))
        self.parallel(jobs)
        if "hac" in self.args.methods and not self.hysac.exists():
            self.step("hysac", "train", "--method", "hysac", "--preset", "demo", "--model", self.base, "--data",
                      self.data, "--out", self.hysac)

    def oracle(self, forget: str) -> Path:
        return self.work / f"oracle-{forget.replace(',', '+')}"

    def unlearn(self, folder: Path, label: str, method: str, forget: str, seed: int, *extra) -> tuple[str, tuple] | None:
        out = folder / label.replace(" ", "-")
        if out.exists():
            return None
        source = self.hysac if method == "hac" else self.base
        return (f"{folder.name}/{label}", ("train", "--method", method, "--preset", "demo", "--model", source,
                                           "--data", self.data, "--forget", forget, "--seed", seed, "--out", out,
                                           *extra))

    def evaluation(self, folder: Path, name: str, forget: str, before: Path, others: list[Path],
                   floors: bool) -> tuple[str, tuple] | None:
        """The ``eval unlearning`` job of one group of artifacts, or None when its report exists."""
        report = folder / name
        if (report / "report.json").exists():
            return None
        return (f"{folder.name}/{name}", ("eval", "unlearning", "--forget", forget, "--data", self.fresh, "--split",
                                          "test", "--out", report, "--probe-limit", self.args.probe_limit,
                                          *(["--floors"] if floors else []), "--compare", before, *others))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("runs/unlearning"))
    ap.add_argument("--from", dest="source", type=Path, default=None,
                    help="take visu, fresh, base and hysac from this folder (the gate models' cache entry)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--forget", action="append", help="a forget set (comma-separated); repeatable")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--jobs", type=int, default=2, help="trainings side by side (one thread each)")
    ap.add_argument("--probe-limit", type=int, default=960, help="train quadruplets the residue probes are fitted on")
    ap.add_argument("--no-sweep", action="store_true", help="skip the weight sweeps and the form=ours rows")
    args = ap.parse_args()
    forget_sets = args.forget or ["graffiti", "graffiti,stolen cash"]
    bench = Bench(args)
    bench.work.mkdir(parents=True, exist_ok=True)
    bench.prepare(forget_sets)

    jobs, plans = [], []
    for i, forget in enumerate(forget_sets):
        for j, seed in enumerate(args.seeds):
            folder = bench.work / f"{forget.replace(',', '+')}-seed{seed}"
            labels = [(m, m, ()) for m in args.methods]
            if i == 0 and not args.no_sweep:
                labels += [(f"{m} ours", m, ("--objective-option", "form=ours")) for m in OURS if m in args.methods]
                if j == 0:
                    labels += [(label, m, ("--weights", w)) for label, m, w in SWEEP if m in args.methods]
            jobs += [job for label, m, extra in labels if (job := bench.unlearn(folder, label, m, forget, seed, *extra))]
            plans.append((forget, seed, folder, labels, j == 0))
    bench.parallel(jobs)

    rows: list[dict] = []
    evaluations, reads = [], []
    for forget, seed, folder, labels, first in plans:
        euclidean = [folder / lb.replace(" ", "-") for lb, m, _ in labels if m != "hac"]
        lorentz = [folder / lb.replace(" ", "-") for lb, m, _ in labels if m == "hac"]
        names = {folder / lb.replace(" ", "-"): lb for lb, _, _ in labels}
        names.update({bench.base: "base", bench.hysac: "hysac", bench.oracle(forget): "oracle (retrained without)"})
        groups = [("eval-euclidean", bench.base, [bench.oracle(forget), *euclidean])]
        if lorentz:
            groups.append(("eval-lorentz", bench.hysac, lorentz))
        for name, before, others in groups:
            job = bench.evaluation(folder, name, forget, before, others, floors=first and name == "eval-euclidean")
            evaluations += [job] if job else []
            reads.append((forget, seed, folder / name, {p.name: names[p] for p in [before, *others]}))
    bench.parallel(evaluations)  # two at a time, as the trainings
    for forget, seed, report, by_dir in reads:
        table = json.loads((report / "report.json").read_text())
        for key, metrics in table.items():
            rows.append({"forget": forget, "seed": seed, "model": by_dir.get(key, key), **metrics})

    lines = []
    models = ["base", "oracle (retrained without)", "hysac", *dict.fromkeys(r["model"] for r in rows)]
    for forget in forget_sets:
        mine = [r for r in rows if r["forget"] == forget]
        lines += [f"\nforget {forget}: mean ± std over seeds {', '.join(map(str, args.seeds))} (synthetic data)\n",
                  "| model | " + " | ".join(f"{m} {BETTER[m]}" for m in METRICS) + " |",
                  "|---" * (len(METRICS) + 1) + "|"]
        for model in dict.fromkeys(models):
            got = [r for r in mine if r["model"] == model]
            if got:
                lines.append(f"| {model} | " + " | ".join(fmt([r.get(m) for r in got]) for m in METRICS) + " |")
        lines += [f"\nforget {forget}, seed {args.seeds[0]}: value [95 % bootstrap interval over the test items]\n",
                  "| model | " + " | ".join(f"{m} {BETTER[m]}" for m in METRICS) + " |",
                  "|---" * (len(METRICS) + 1) + "|"]
        for model in dict.fromkeys(models):
            got = [r for r in mine if r["model"] == model and r["seed"] == args.seeds[0]]
            if got:
                lines.append(f"| {model} | " + " | ".join(with_ci(got[0], m) for m in METRICS) + " |")
    print("\n".join(lines))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "synthetic": True, "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "seeds": args.seeds, "forget_sets": forget_sets, "rows": rows, "timings_s": bench.timings, "table": lines,
    }, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
