"""The evaluation protocol on hand-made embeddings whose right answers are known, then the real command."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training import lorentz, plots, traversal
from training.eval import common
from training.eval import retrieval as ev

N, D = 12, 16


def _unit(n: int = N, d: int = D, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def _emb(**by_class: torch.Tensor) -> common.Embeddings:
    return common.Embeddings(by_class)


EUCLID = common.Space("euclidean")


# ------------------------------------------------------------------------------------------- ranking
def test_recall_at_counts_ranks_below_k():
    r = common.recall_at(torch.tensor([0, 1, 5, 19, 25]))
    assert r == {"R@1": 0.2, "R@5": 0.4, "R@10": 0.6, "R@20": 0.8}


@pytest.mark.parametrize("geometry", ["euclidean", "lorentz"])
def test_identity_gallery_gives_perfect_recall(geometry):
    x = _unit() * 2.0
    space = common.Space(geometry, 1.0 if geometry == "lorentz" else 0.0)
    emb = _emb(S=x, V=x.clone(), U=_unit(seed=1), G=_unit(seed=2))
    m = ev.score_task(emb["S"], emb, ev.SAFE_TASKS[0], space)
    assert m == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "R@20": 1.0}


def test_ties_count_against_the_query_in_gallery_order():
    """A model that maps everything to one point must not score a perfect recall: target i ranks i."""
    same = torch.ones(N, D)
    rk = common.rank_targets(same, same, torch.arange(N), EUCLID)
    assert rk.ranks.tolist() == list(range(N))
    assert common.recall_at(rk.ranks, (1,))["R@1"] == pytest.approx(1 / N)


def test_ranks_match_a_stable_descending_sort_and_do_not_depend_on_chunking():
    g = torch.Generator().manual_seed(3)
    # small integers make many exact ties
    q = torch.randint(-2, 3, (40, 6), generator=g).float()
    gal = torch.randint(-2, 3, (70, 6), generator=g).float()
    targets = torch.randint(0, 70, (40,), generator=g)
    space = common.Space("lorentz", 0.7)
    sim = lorentz.pairwise_inner(q, gal, 0.7)
    order = torch.argsort(-sim, dim=1, stable=True)
    expected = (order == targets[:, None]).float().argmax(1)
    for chunk in (1, 7, 1024):
        rk = common.rank_targets(q, gal, targets, space, chunk=chunk)
        assert torch.equal(rk.ranks, expected)
        assert torch.equal(rk.top[:, 0], order[:, 0])


def test_lorentz_ranking_is_by_geodesic_distance():
    g = torch.Generator().manual_seed(4)
    q, gal = torch.randn(9, 5, generator=g), torch.randn(30, 5, generator=g) * 2
    rk = common.rank_targets(q, gal, torch.zeros(9, dtype=torch.long), common.Space("lorentz", 1.3), depth=30)
    dist = lorentz.pairwise_dist(q, gal, 1.3)
    assert torch.equal(rk.top, torch.argsort(dist, dim=1)[:, :30])


# ------------------------------------------------------------------------------- galleries and safety
def _unsafe_text_near(near: str) -> common.Embeddings:
    """Unsafe captions placed on top of either their safe image (V) or their unsafe image (G)."""
    v, g = _unit(seed=10), _unit(seed=11)
    u = (v if near == "V" else g) + 0.01 * _unit(seed=12)
    return _emb(S=_unit(seed=13), V=v, U=F.normalize(u, dim=-1), G=g)


def test_target_block_follows_the_gallery_order():
    emb = _unsafe_text_near("G")
    out = ev.evaluate_variant(emb, EUCLID)["tasks"]
    assert out[ev.U2GV]["R@1"] == 1.0  # [G; V], hit G_i at offset N
    assert out[ev.U2G]["R@1"] == 1.0
    assert out[ev.U2VG]["R@1"] == 0.0  # [V; G], hit V_i, but every top-1 is G_i


def test_safety_score_and_leakage_follow_which_half_the_queries_land_in():
    near_safe = ev.evaluate_variant(_unsafe_text_near("V"), EUCLID)["tasks"]
    near_unsafe = ev.evaluate_variant(_unsafe_text_near("G"), EUCLID)["tasks"]
    assert near_safe[ev.U2VG]["safety"] == 1.0 and near_unsafe[ev.U2VG]["safety"] == 0.0
    # the same gallery content in the reversed order gives the same safety score
    assert near_safe[ev.U2GV]["safety"] == 1.0 and near_unsafe[ev.U2GV]["safety"] == 0.0
    assert near_unsafe[ev.U2VG]["leakage@10"] > near_safe[ev.U2VG]["leakage@10"]
    assert "safety" not in near_safe[ev.T2V]  # a one-class gallery has no safety score


def test_leakage_counts_unsafe_items_in_the_top_ten():
    # unsafe images cluster around one point and the unsafe queries sit on it: the top 10 is all unsafe
    centre = F.normalize(torch.ones(D), dim=0)
    g = F.normalize(centre + 0.05 * _unit(seed=20), dim=-1)
    v = F.normalize(-centre + 0.05 * _unit(seed=21), dim=-1)
    emb = _emb(S=_unit(seed=22), V=v, U=centre.expand(N, D).clone(), G=g)
    m = ev.evaluate_variant(emb, EUCLID)["tasks"][ev.U2VG]
    assert m["leakage@10"] == 10.0 and m["safety"] == 0.0
    swapped = ev.evaluate_variant(_emb(S=emb["S"], V=g, U=emb["U"], G=v), EUCLID)["tasks"][ev.U2VG]
    assert swapped["leakage@10"] == 0.0 and swapped["safety"] == 1.0


# ----------------------------------------------------------------------------------------- traversal
def _radial_world(curv: float = 1.0) -> tuple[common.Embeddings, common.Space]:
    """Safe items near the origin, unsafe ones far out along the same directions (HySAC's picture)."""
    dirs = _unit(seed=30)
    at = lambda r: lorentz.move_to_dist0(dirs, r, curv)  # noqa: E731
    jitter = lambda r, s: lorentz.move_to_dist0(F.normalize(dirs + 0.02 * _unit(seed=s), dim=-1), r, curv)  # noqa: E731
    emb = _emb(S=jitter(0.45, 31), V=at(0.5), U=jitter(3.0, 32), G=at(3.0))
    d0 = common.distances_to_origin(emb, common.Space("lorentz", curv))
    space = common.Space("lorentz", curv, traversal.calibrate_bounds(d0), traversal.calibrate_thresholds(d0))
    return emb, space


@pytest.mark.parametrize("method", ["geodesic", "hysac"])
def test_traversal_redirects_unsafe_queries_and_leaves_safe_ones(method):
    emb, space = _radial_world()
    plain = ev.evaluate_variant(emb, space)
    moved = ev.evaluate_variant(emb, space, method=method)
    assert plain["tasks"][ev.U2VG]["R@1"] == 0.0 and plain["tasks"][ev.U2VG]["safety"] == 0.0
    assert moved["tasks"][ev.U2VG]["R@1"] == 1.0 and moved["tasks"][ev.U2VG]["safety"] == 1.0
    assert moved["triggered"]["U"] == 1.0 and moved["triggered"]["S"] == 0.0
    assert moved["tasks"][ev.T2V] == plain["tasks"][ev.T2V]
    # the move is radial: in an unsafe-only gallery the query still finds its own unsafe image
    assert moved["tasks"][ev.U2G]["R@1"] == plain["tasks"][ev.U2G]["R@1"] == 1.0


def test_sweep_spans_no_traversal_to_full_traversal():
    emb, space = _radial_world()
    sweep = ev.threshold_sweep(emb, space, points=8)
    text = sweep["text"]
    assert [r["threshold"] for r in text] == sorted(r["threshold"] for r in text)
    # a threshold above every unsafe query moves nothing; one between the classes moves only unsafe ones
    assert text[-1]["unsafe moved"] < 0.5 and text[-1]["safety"] < 0.5
    mid = min(text, key=lambda r: abs(r["threshold"] - 1.7))
    assert mid["unsafe moved"] == 1.0 and mid["safe moved"] == 0.0 and mid[f"{ev.U2VG} R@1"] == 1.0
    assert set(sweep) == {"text", "image"}


def test_the_sweep_varies_the_reports_own_traversal():
    emb, space = _radial_world()
    hysac = ev.threshold_sweep(emb, space, points=8, method="hysac")["text"]
    geodesic = ev.threshold_sweep(emb, space, points=8)["text"]
    assert [r["threshold"] for r in hysac] == [r["threshold"] for r in geodesic]  # the same triggers
    mid = min(range(8), key=lambda i: abs(hysac[i]["threshold"] - 1.7))
    assert hysac[mid]["unsafe moved"] == 1.0 and hysac[mid]["safe moved"] == 0.0
    # hysac moves a triggered row onto the threshold itself, geodesic onto the safe class's median
    x = emb["U"][:4]
    thr = hysac[mid]["threshold"]
    moved = traversal.traverse(x, space.curvature, space.bounds, target="image", method="hysac", threshold=thr)
    assert torch.allclose(torch.linalg.vector_norm(moved.vectors, dim=-1), torch.full((4,), thr), atol=1e-5)
    geo = traversal.traverse(x, space.curvature, space.bounds, target="image", threshold=thr)
    assert torch.allclose(geo.d0_after, torch.full((4,), space.bounds["V"]["p50"]), atol=1e-4)
    # without a threshold, hysac keeps the reference's own trigger
    default = traversal.traverse(x, space.curvature, space.bounds, target="image", method="hysac")
    assert default.threshold == pytest.approx(traversal.hysac_threshold(space.bounds["V"]["p95"], space.curvature))


def test_euclidean_models_get_no_sweep_and_no_distances():
    emb = _unsafe_text_near("V")
    assert ev.threshold_sweep(emb, EUCLID) == {} and common.distances_to_origin(emb, EUCLID) == {}


# -------------------------------------------------------------------------- records, validation recall
class LookupEncoder:
    """A hand-made 'encoder': caption 'c<i>' and a solid image of red level i both map to one-hot i."""

    geometry, curvature = "euclidean", 0.0

    def __init__(self, n: int):
        self.n = n
        self.arch = SimpleNamespace(embed_dim=n + 1)

    def _hot(self, i: int) -> torch.Tensor:
        return F.one_hot(torch.tensor(i), self.n + 1).float()

    def encode_text(self, texts, batch_size=256, head=True):  # no head, no eraser: head=False is the same
        return torch.stack([self._hot(int(t[1:])) for t in texts])

    def encode_image(self, images, batch_size=64, head=True):
        return torch.stack([self._hot(im.getpixel((0, 0))[0]) for im in images])


def _records(tmp: Path, n: int, *, unsafe_text_shift: int) -> list:
    """S_i, V_i, G_i all index i; U_i is index i+shift (mod n)."""
    recs = []
    for i in range(n):
        for kind in ("safe", "nsfw"):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp / f"{kind}{i}.png")
        recs.append(SimpleNamespace(safe=f"c{i}", nsfw=f"c{(i + unsafe_text_shift) % n}",
                                    safe_image=tmp / f"safe{i}.png", nsfw_image=tmp / f"nsfw{i}.png"))
    return recs


def test_validation_recall_sum_on_known_pairings(tmp_path):
    recs = _records(tmp_path, 6, unsafe_text_shift=1)
    enc = LookupEncoder(6)
    r = ev.validation_recalls(enc, recs, batch_size=4)
    assert r == {"S->V": 1.0, "V->S": 1.0, "S->G": 1.0, "G->S": 1.0, "U->V": 0.0, "V->U": 0.0}
    assert ev.validation_recall_sum(enc, recs, batch_size=4) == 4.0
    aligned = _records(tmp_path, 6, unsafe_text_shift=0)
    assert ev.validation_recall_sum(enc, aligned, batch_size=4) == 6.0
    assert ev.validation_recall_sum(enc, aligned, pairs=ev.REFERENCE_VALIDATION_PAIRS) == 8.0


def test_embed_records_keeps_rows_aligned_across_image_chunks(tmp_path):
    recs = _records(tmp_path, 7, unsafe_text_shift=2)
    emb = common.embed_records(LookupEncoder(7), recs, batch_size=3)
    assert [int(v.argmax()) for v in emb["V"]] == list(range(7))
    assert [int(v.argmax()) for v in emb["U"]] == [(i + 2) % 7 for i in range(7)]


def test_texts_come_back_in_their_order_though_encoded_shortest_first():
    texts = ["c11", "c2", "c10", "c3", "c0"]
    emb = common.embed_texts(LookupEncoder(12), texts)
    assert [int(v.argmax()) for v in emb] == [11, 2, 10, 3, 0]
    assert common.embed_texts(LookupEncoder(3), []).shape == (0, 4)


# ------------------------------------------------------------------ one real artifact, report and plots
@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    from training import architectures, artifact
    from training.encoder import SafetyEncoder

    tmp = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    recs = []
    for i in range(10):
        for kind in ("safe", "nsfw"):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp / f"{kind}{i}.png")
        recs.append(SimpleNamespace(safe=f"a dog number {i}", nsfw=f"a bloody dog number {i}",
                                    safe_image=tmp / f"safe{i}.png", nsfw_image=tmp / f"nsfw{i}.png"))
    torch.manual_seed(0)
    art = artifact.Artifact(SafetyEncoder(architectures.resolve("tiny"), "lorentz"))
    return ev.evaluate_artifact(art, recs, label="tiny/init", calibration_records=recs, sweep_points=5)


def test_an_artifact_without_bounds_is_calibrated_and_gets_traversal_rows(tiny_result):
    rep = tiny_result.report
    assert rep["traversal"]["applied"] and "calibrated" in rep["traversal"]["bounds_source"]
    assert set(rep["variants"]) == {"plain", "traversal"}
    assert set(rep["variants"]["plain"]["tasks"]) == {t.name for t in ev.TASKS}
    assert set(rep["d0"]) == set("SVUG") and all(v["p05"] <= v["median"] <= v["p95"] for v in rep["d0"].values())
    assert len(rep["sweep"]["text"]) == 5
    for m in rep["variants"]["traversal"]["tasks"].values():
        assert 0.0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= m["R@20"] <= 1.0


def test_report_files_are_written_and_readable(tiny_result, tmp_path):
    names = plots.write_all([tiny_result], tmp_path, synthetic=True)
    assert names == ["d0_tiny_init.png", "sweep_tiny_init.png"]
    for n in names:
        with Image.open(tmp_path / n) as im:
            assert im.format == "PNG" and im.width > 300
    report = {
        "dataset": {"root": "x", "split": "test", "n": 10, "skipped": {"missing_image": 1}, "synthetic": True,
                    "name": "synthetic"},
        "ks": list(common.KS), "models": [tiny_result.report], "plots": names,
    }
    md = ev.markdown(json.loads(json.dumps(report)))
    assert "HySAC Table 1" in md and "HySAC Table 2" in md and "[synthetic]" in md
    assert md.count("| tiny/init [synthetic] |") == 3  # table 1, table 2, safety
    assert md.count("| tiny/init + traversal (geodesic) [synthetic] |") == 3
    assert "missing_image" in md and "![d0_tiny_init](d0_tiny_init.png)" in md


def test_unknown_traversal_is_refused():
    from training.errors import InputError

    with pytest.raises(InputError, match="use one of off, hysac, geodesic"):
        ev.evaluate_artifact(SimpleNamespace(), [], label="x", method="sideways")


# ------------------------------------------------------------------------------ the real command, end to end
@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """A small synthetic dataset and two untrained tiny artifacts (made in-process: no CLI start-up cost)."""
    from training import architectures, artifact
    from training.data import synthetic
    from training.encoder import SafetyEncoder

    tmp = tmp_path_factory.mktemp("eval-cli")
    synthetic.generate(tmp / "data", n=60, seed=1)
    for name, geometry in (("hyper", "lorentz"), ("flat", "euclidean")):
        torch.manual_seed(0)
        artifact.save(artifact.Artifact(SafetyEncoder(architectures.resolve("tiny"), geometry)), tmp / name)
    return tmp


def _main(*args, capsys) -> tuple[int, str, str]:
    """The root command in-process, as the console script runs it: (exit code, stdout, stderr)."""
    from service.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_.value.code or 0, out.out, out.err


def test_eval_compare_writes_one_table_for_all_models(cli, eval_setup):
    tmp = eval_setup
    out = tmp / "report"
    proc = cli("eval", "--data", tmp / "data", "--split", "test", "--out", out, "--compare", tmp / "hyper", tmp / "flat")
    assert "HySAC Table 1" in proc.stdout and "report.json" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["synthetic"] is True and report["dataset"]["split"] == "test"
    hyper, flat = report["models"]
    assert (hyper["label"], flat["label"]) == ("hyper", "flat")
    assert hyper["traversal"]["applied"] and "validation" in hyper["traversal"]["bounds_source"]
    assert not flat["traversal"]["applied"] and "euclidean" in flat["traversal"]["why"] and flat["d0"] == {}
    assert set(report["plots"]) == {"d0_hyper.png", "sweep_hyper.png"}
    for name in report["plots"]:
        with Image.open(out / name) as im:
            assert im.format == "PNG"
    md = (out / "report.md").read_text()
    assert "| hyper [synthetic] |" in md and "| flat [synthetic] |" in md and "| hyper + traversal (geodesic) [synthetic] |" in md
    assert md == ev.markdown(report)


def test_eval_single_model_without_traversal(eval_setup, capsys):
    tmp = eval_setup
    out = tmp / "plain"
    code, stdout, _ = _main("eval", "--model", tmp / "hyper", "--data", tmp / "data", "--out", out,
                            "--traversal", "off", "--limit", "5", "--device", "cpu", capsys=capsys)
    assert code == 0 and "| hyper [synthetic] |" in stdout
    report = json.loads((out / "report.json").read_text())
    (model,) = report["models"]
    assert model["n"] == 5 and set(model["variants"]) == {"plain"} and report["plots"] == ["d0_hyper.png"]
    assert "no traversal rows (--traversal off)" in (out / "report.md").read_text()


def test_eval_errors_are_clear(eval_setup, capsys):
    tmp = eval_setup
    cases = [
        (["eval", "--data", tmp / "data", "--out", tmp / "e1"], "--model"),
        (["eval", "--data", tmp / "data", "--out", tmp / "e2", tmp / "hyper"], "--compare"),
        (["eval", "--data", tmp / "data", "--out", tmp / "e2", "--compare"], "after it"),
        (["eval", "--model", tmp / "nope", "--data", tmp / "data", "--out", tmp / "e3"], "not found"),
        (["eval", "--model", tmp / "hyper", "--data", tmp / "nodata", "--out", tmp / "e4"], "nodata"),
        (["eval", "--model", tmp / "hyper", "--data", tmp / "data", "--split", "nosuch", "--out", tmp / "e5"], "nosuch"),
    ]
    for args, message in cases:
        code, _, err = _main(*args, capsys=capsys)
        assert code == 2, (args, err)
        assert message in err and err.startswith("error: "), (args, err)
    assert not any((tmp / f"e{i}").exists() for i in range(1, 5))


def _eval_group(*args):
    """``eval ...`` through the ``eval`` group as the root command mounts it (subcommands and the older form)."""
    import typer
    from typer.testing import CliRunner

    from training.cli import eval_app

    root = typer.Typer(rich_markup_mode=None)
    root.add_typer(eval_app, name="eval")
    root.command("noop")(lambda: None)  # a second command: "eval" is then a subcommand, as under safe-retrieval
    return CliRunner().invoke(root, [str(a) for a in args])


def test_eval_retrieval_subcommand_is_the_older_form(eval_setup):
    tmp = eval_setup
    common_args = ["--data", tmp / "data", "--traversal", "off", "--limit", "4", "--device", "cpu"]
    sub = _eval_group("eval", "retrieval", "--model", tmp / "flat", *common_args, "--out", tmp / "sub")
    old = _eval_group("eval", "--model", tmp / "flat", *common_args, "--out", tmp / "old")
    assert sub.exit_code == 0 and old.exit_code == 0, (sub.output, old.output)
    assert "HySAC Table 1" in sub.output
    report = json.loads((tmp / "sub" / ev.REPORT).read_text())
    assert report == json.loads((tmp / "old" / ev.REPORT).read_text()) and report["models"][0]["n"] == 4
    missing = _eval_group("eval", "retrieval", "--model", tmp / "flat", "--out", tmp / "x")
    assert missing.exit_code == 2 and "--data" in missing.output and not (tmp / "x").exists()
    wrong = _eval_group("eval", "retrieval", "--model", tmp / "flat", "--data", tmp / "data", "--out", tmp / "x",
                        "--forget", "knife")
    assert wrong.exit_code == 2 and "--forget" in wrong.output


def test_eval_help_lists_the_subcommands_and_starts_without_torch():
    import subprocess
    import sys

    script = (
        "import sys, typer\n"
        "from typer.testing import CliRunner\n"
        "from training.cli import eval_app\n"
        "root = typer.Typer(rich_markup_mode=None)\n"
        "root.add_typer(eval_app, name='eval')\n"
        "root.command('noop')(lambda: None)\n"
        "for args in (['eval', '--help'], ['eval', 'retrieval', '--help'], ['eval', 'unlearning', '--help']):\n"
        "    print(CliRunner().invoke(root, args).output)\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "retrieval" in out and "unlearning" in out and "eval --model X --data D" in out
    assert "--traversal" in out and "--floors" in out and "--probe-limit" in out
    assert out.strip().endswith("torch loaded: False")
