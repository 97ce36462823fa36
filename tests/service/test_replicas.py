"""Several API replicas on one state volume: one runs the jobs, the others write nothing and follow the index.

A replica started with ``run_jobs=False`` has no job manager (so it can neither start a job nor mark
the job runner's running job as failed when it starts), never writes the served-pair record, and
swaps in each generation the index is switched to, with the model that generation was built with.
"""

from __future__ import annotations

import time

import pytest

from service.app import create_app
from service.state import SERVED_RECORD
from tests.helpers.service import ADMIN, build_index, copy_index, live, settings_for
from training.errors import InputError


def test_a_replica_without_jobs_follows_the_index_and_writes_nothing(world, tmp_path):
    root = copy_index(world, tmp_path / "indexes")
    state = tmp_path / "state"
    state.mkdir()
    settings = settings_for(world, tmp_path, index_root=root, state_dir=state, audit_dir=tmp_path / "audit", run_jobs=False,
                            store_retry_s=0.2)
    with live(settings) as replica, replica.client(ADMIN) as c:
        first = c.get("/readyz").json()["index"]["generation"]
        assert first == world.generation
        for path in ("/v1/admin/jobs",):
            r = c.get(path)
            assert r.status_code == 403 and "RUN_JOBS" in r.json()["detail"]
        r = c.post("/v1/admin/reindex", json={"source": {"visu": str(world.data), "split": "test"}})
        assert r.status_code == 403

        # the job runner (here: the indexer itself) switches the index to a new generation
        second = build_index(world.model, world.data, root)
        assert second != first
        deadline = time.monotonic() + 120
        served, body = first, None
        while served != second and time.monotonic() < deadline:
            time.sleep(0.2)
            body = c.get("/readyz").json()
            served = (body.get("index") or {}).get("generation")
        assert served == second, f"the replica did not follow the index to {second}; /readyz: {body}"
        assert c.post("/v1/search", json={"text": "a cat"}).status_code == 200
    assert list(state.iterdir()) == [], f"a replica without jobs wrote {[p.name for p in state.iterdir()]}"
    assert not (state / SERVED_RECORD).exists()


def test_a_replica_without_jobs_that_could_audit_needs_an_audit_dir_of_its_own(world, tmp_path):
    state = tmp_path / "state"
    for audit_dir in (None, state / "audit", state):  # the default, STATE_DIR/audit: the job runner's log
        with pytest.raises(InputError) as refused:
            create_app(settings_for(world, tmp_path, run_jobs=False, audit_dir=audit_dir))
        assert "RUN_JOBS=false" in str(refused.value) and "set SAFE_RETRIEVAL_AUDIT_DIR" in str(refused.value)
    for tokens in ({"moderator_token": None}, {"admin_token": None}):  # either token can write records
        with pytest.raises(InputError):
            create_app(settings_for(world, tmp_path, run_jobs=False, **tokens))
    create_app(settings_for(world, tmp_path, run_jobs=False, admin_token=None, moderator_token=None))  # nothing to audit
    create_app(settings_for(world, tmp_path, run_jobs=False, audit_dir=tmp_path / "audit"))
    create_app(settings_for(world, tmp_path))  # the job runner keeps the default
    assert not state.exists()
