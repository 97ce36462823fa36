"""``POST /v1/admin/forget``: its checks before any job starts, and forget jobs on the real service.

Bad requests are refused synchronously (unknown concept, or one no training pair shows -> 422 listing
the known ones; ``hac`` on a Euclidean model -> 422 naming ``ac``; no dataset known -> 422) and submit
no job. A forget job runs
the real CLI (``train --forget``, ``eval --unlearning``, ``index build --no-switch``) on a tiny
synthetic dataset; it swaps the served model and index together and its result holds the
evaluation's table, while a cancelled or failed one leaves the served pair as it was.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from service.jobs import JOB_DIR, forget_steps
from service.schemas import ForgetRequest
from tests.helpers.service import ADMIN, INDEX, MODERATOR, LiveServer, World, build_index, copy_index, live, settings_for

KNOWN = "concepts: blood, broken glass, bruised face"  # the start of the synthetic dataset's list


def with_training_data(world: World, out: Path, data: Path) -> Path:
    """A copy of the world's model whose provenance names ``data`` as its training data (the same fingerprint:
    provenance is not fingerprinted, so the world's index still matches it)."""
    shutil.copytree(world.model, out)
    config = json.loads((out / "config.json").read_text())
    config["provenance"]["data"] = str(data)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


@pytest.fixture(scope="module")
def euclidean_server(world, tmp_path_factory) -> Iterator[LiveServer]:
    """A server of a Euclidean tiny model whose provenance names the world's dataset, with its own index."""
    import torch

    from training import architectures, artifact
    from training.encoder import SafetyEncoder

    tmp = tmp_path_factory.mktemp("forget-euclidean")
    torch.manual_seed(0)
    art = artifact.Artifact(SafetyEncoder(architectures.resolve("tiny"), "euclidean"),
                            provenance=artifact.provenance("test: euclidean tiny", data=str(world.data)))
    artifact.save(art, tmp / "model")
    build_index(tmp / "model", world.data, tmp / "idx")
    with live(settings_for(world, tmp, model=tmp / "model", index_root=tmp / "idx")) as s:
        yield s


# ------------------------------------------------------------------ the command lines
def test_forget_steps_train_then_evaluate_confined_to_the_data_roots(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    req = ForgetRequest(concepts=["weapons"], method="ac", epochs=2, max_steps=3, seed=5)
    train, evaluate = forget_steps(req, concepts=["gun", "knife"], model=tmp_path / "served", out=tmp_path / "new",
                                   data=root, roots=[root, tmp_path / "not-there"])
    assert train[:2] == ["train", "--method"] and train[2] == "ac"
    assert train[train.index("--forget") + 1] == "gun,knife"  # the names the tag stands for, as training reads them
    assert train[train.index("--model") + 1] == str(tmp_path / "served")
    assert train[train.index("--out") + 1] == str(tmp_path / "new")
    assert [train[i + 1] for i, a in enumerate(train) if a == "--data-root"] == [str(root)]
    assert {train[train.index(f) + 1] for f in ("--epochs", "--max-steps", "--seed")} == {"2", "3", "5"}
    assert "--lr" not in train and "--preset" not in train  # unset options are the trainer's defaults
    assert evaluate[:4] == ["eval", "--unlearning", "--forget", "gun,knife"]
    assert evaluate[evaluate.index("--out") + 1] == f"{JOB_DIR}/unlearning"
    assert evaluate[evaluate.index("--split") + 1] == "test"
    assert evaluate[-3:] == ["--compare", str(tmp_path / "served"), str(tmp_path / "new")]  # before, after
    assert [evaluate[i + 1] for i, a in enumerate(evaluate) if a == "--data-root"] == [str(root)]  # eval reads there only


# ------------------------------------------------------------------ refused before any job starts
def test_an_unknown_concept_is_422_listing_the_known_ones_and_starts_no_job(euclidean_server):
    with euclidean_server.client(ADMIN) as c:
        # no `data`: the served model's provenance names the world's dataset, whose dataset.json lists the concepts
        r = c.post("/v1/admin/forget", json={"concepts": ["knife", "unicorn"]})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert r.json()["error"] == "UnprocessableError"
        assert "unknown concept 'unicorn'" in detail and KNOWN in detail and "weapons (gun, knife)" in detail
        assert c.get("/v1/admin/jobs").json() == {"jobs": []}
        assert _models(euclidean_server) == []


def test_hac_on_a_euclidean_model_is_422_suggesting_ac(euclidean_server):
    with euclidean_server.client(ADMIN) as c:
        r = c.post("/v1/admin/forget", json={"concepts": ["knife"], "method": "hac"})
        assert r.status_code == 422, r.text
        assert "lorentz" in r.json()["detail"] and "use method 'ac'" in r.json()["detail"]
        assert c.get("/v1/admin/jobs").json() == {"jobs": []}


def test_without_data_a_model_that_records_none_is_422_asking_for_it(server, world):
    with server.client(ADMIN) as c:  # the world's model: its provenance names no dataset
        r = c.post("/v1/admin/forget", json={"concepts": ["knife"]})
        assert r.status_code == 422, r.text
        assert "records no training data" in r.json()["detail"] and "give `data`" in r.json()["detail"]
        # given `data`, the concepts are checked against it (a tag, any case, is known too)
        r = c.post("/v1/admin/forget", json={"concepts": ["Weapons", "dragon"], "data": "data"})
        assert r.status_code == 422 and "unknown concept 'dragon'" in r.json()["detail"]
        # paths are checked as for every job: outside the data roots is a 400
        for bad in ("/etc", "../..", "nothing-here"):
            r = c.post("/v1/admin/forget", json={"concepts": ["knife"], "data": bad})
            assert r.status_code == 400, (bad, r.text)
        assert c.get("/v1/admin/jobs").json() == {"jobs": []}


def test_a_concept_no_training_pair_shows_is_422_before_any_job(server, world):
    from training.data import concepts, synthetic, visu

    few = world.root / "forget-few"  # 10 train quadruplets: most of the 22 concepts appear in none
    if not few.exists():
        synthetic.generate(few, n=12, seed=0)
    records = visu.load_split(few, "train").records
    absent = next(c for c in concepts.catalogue(few, records).concepts.values() if not any(c.shown_by(r) for r in records))
    present = next(c for c in concepts.catalogue(few, records).concepts.values() if any(c.shown_by(r) for r in records))
    with server.client(ADMIN) as c:
        r = c.post("/v1/admin/forget", json={"concepts": [present.name, absent.name], "data": "forget-few"})
        assert r.status_code == 422, r.text
        assert f"no training pair shows {absent.name}" in r.json()["detail"] and KNOWN in r.json()["detail"]
        assert c.get("/v1/admin/jobs").json() == {"jobs": []}


def test_a_model_whose_training_data_lies_outside_the_data_roots_needs_data(world, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(world.data, outside)
    model = with_training_data(world, tmp_path / "model", outside)
    with live(settings_for(world, tmp_path, model=model, index_root=copy_index(world, tmp_path / "idx"))) as s, \
            s.client(ADMIN) as c:
        r = c.post("/v1/admin/forget", json={"concepts": ["knife"]})
        assert r.status_code == 422, r.text
        assert "outside the data roots" in r.json()["detail"] and "give `data`" in r.json()["detail"]
        assert c.get("/v1/admin/jobs").json() == {"jobs": []}


@pytest.mark.parametrize("body", [
    {},
    {"concepts": []},
    {"concepts": ["knife"] * 33},
    {"concepts": [""]},
    {"concepts": ["   "]},
    {"concepts": ["knife,gun"]},  # the CLI's separator: one name per item
    {"concepts": ["k" * 65]},
    {"concepts": ["knife\x00"]},
    {"concepts": "knife"},
    {"concepts": ["knife"], "method": "hysac"},
    {"concepts": ["knife"], "epochs": 1.5},
    {"concepts": ["knife"], "preset": "full"},
    {"concepts": ["knife"], "forget": True},
])
def test_malformed_forget_bodies_are_422(server, body):
    with server.client(ADMIN) as c:
        r = c.post("/v1/admin/forget", json=body)
        assert r.status_code == 422 and r.json()["error"] == "ValidationError", r.text


def test_forget_needs_the_admin_token(server):
    for token in (None, "wrong", MODERATOR):
        with server.client(token) as c:
            r = c.post("/v1/admin/forget", json={"concepts": ["knife"], "data": "data"})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (token, r.text)
    with server.client(ADMIN) as c:
        assert c.get("/v1/admin/jobs").json() == {"jobs": []}
        schema = c.get("/openapi.json").json()["paths"]["/v1/admin/forget"]["post"]
        assert {"401", "409", "422"} <= set(schema["responses"])


# ------------------------------------------------------------------ forget jobs
def _serves(s: LiveServer, c, ref: dict) -> None:
    assert (s.settings.index_root / INDEX / "CURRENT").read_text().strip() == ref["generation"]
    r = c.post("/v1/search", json={"text": "a photo of a dog", "k": 3})
    assert r.status_code == 200 and r.json()["index"] == ref


def _models(s: LiveServer) -> list[str]:
    """What the job left in the state volume's models folder (it may not exist yet)."""
    folder = s.settings.state_dir / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _forget_server(world: World, tmp: Path):
    return live(settings_for(world, tmp, index_root=copy_index(world, tmp / "idx")))


SOURCE = {"visu": "data", "split": "test", "captions": True}


def test_a_forget_job_cancelled_at_once_changes_nothing_served(world, tmp_path):
    with _forget_server(world, tmp_path) as s, s.client(ADMIN) as admin, s.client() as c:
        before = c.post("/v1/search", json={"text": "a cat"}).json()["index"]
        job = admin.post("/v1/admin/forget", json={"concepts": ["knife"], "data": "data", "source": SOURCE})
        assert job.status_code == 202, job.text
        assert job.json()["kind"] == "forget" and job.json()["request"]["concepts"] == ["knife"]
        # while it runs, another submission is a 409 at once: before the dataset is read (which would say 422)
        started = time.monotonic()
        busy = admin.post("/v1/admin/forget", json={"concepts": ["no such concept"], "data": "data"})
        assert busy.status_code == 409 and busy.json()["job_id"] == job.json()["id"], busy.text
        assert time.monotonic() - started < 2
        done = admin.post(f"/v1/admin/jobs/{job.json()['id']}/cancel").json()
        assert done["status"] == "cancelled" and done["result"] == {}
        _serves(s, c, before)
        assert _models(s) == []  # the new model (and its run) deleted
        assert s.services.generations().generations() == [before["generation"]]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A data root holding ``tiny``: 120 synthetic quadruplets of 32 px (96 train, 12 test)."""
    from training.data import synthetic

    root = tmp_path_factory.mktemp("forget-data")
    synthetic.generate(root / "tiny", n=120, seed=1, image_size=32)
    return root


METRICS = {"f_acc", "r_acc", "f_recall", "r_recall", "residue", "benign_drop", "multi_concept"}


def test_a_forget_job_swaps_model_and_index_and_reports_its_table(world, tiny_root, tmp_path):
    from training.artifact import read_config

    settings = settings_for(world, tmp_path, index_root=copy_index(world, tmp_path / "idx"),
                            data_roots=[world.root, tiny_root])
    body = {"concepts": ["weapons"], "data": str(tiny_root / "tiny"), "epochs": 1, "max_steps": 3, "seed": 0,
            "source": SOURCE}
    with live(settings) as s, s.client(ADMIN) as admin, s.client() as c:
        before = c.post("/v1/search", json={"text": "a cat"}).json()["index"]
        job = admin.post("/v1/admin/forget", json=body)
        assert job.status_code == 202, job.text
        busy = admin.post("/v1/admin/forget", json=body)  # one job at a time
        assert busy.status_code == 409 and busy.json()["job_id"] == job.json()["id"]
        done = s.services.jobs.wait(job.json()["id"], timeout=180)
        assert done["status"] == "succeeded", done
        after = c.post("/v1/search", json={"text": "a cat"}).json()["index"]
        assert after["model"] != before["model"] and after["generation"] != before["generation"]
        _serves(s, c, after)
        result = done["result"]
        assert result["swapped"] is True and result["index"] == after
        new = Path(result["model"])
        assert s.services.state.current.model_path == new and new.parent == settings.state_dir / "models"

        table = result["unlearning"]
        assert table["concepts"] == ["gun", "knife"] and table["method"] == "cliperase"  # the tag's concepts
        assert table["before"] == world.model.name and table["after"] == new.name
        assert set(table["table"]) == {table["before"], table["after"]}
        for row in table["table"].values():
            assert METRICS <= set(row), row
        forgotten = read_config(new)["provenance"]["forget"]
        assert forgotten["concepts"] == ["gun", "knife"]
        assert (table["forget_pairs"], table["retain_pairs"]) == (forgotten["forget_pairs"], forgotten["retain_pairs"])
        assert table["forget_pairs"] > 0 and table["retain_pairs"] > 0
        assert Path(table["report"]).is_file()
        assert "--forget gun,knife" in (s.settings.state_dir / "jobs" / done["id"] / "log.txt").read_text()


def test_a_failed_forget_job_changes_nothing_served(world, tiny_root, tmp_path):
    """A dataset without a validation split passes the route's checks (they read the train split only); the
    job's training step refuses it."""
    roots = tmp_path / "roots"
    data = shutil.copytree(tiny_root / "tiny", roots / "odd")
    (data / "ViSU-Text_validation.json").unlink()
    settings = settings_for(world, tmp_path, index_root=copy_index(world, tmp_path / "idx"),
                            data_roots=[world.root, roots])
    with live(settings) as s, s.client(ADMIN) as admin, s.client() as c:
        before = c.post("/v1/search", json={"text": "a cat"}).json()["index"]
        job = admin.post("/v1/admin/forget", json={"concepts": ["knife"], "data": "odd", "max_steps": 1,
                                                   "source": SOURCE})
        assert job.status_code == 202, job.text
        done = s.services.jobs.wait(job.json()["id"], timeout=120)
        assert done["status"] == "failed" and "no ViSU-Text file for split 'validation'" in done["error"], done
        assert done["result"] == {}
        _serves(s, c, before)
        assert _models(s) == [] and s.services.generations().generations() == [before["generation"]]
