"""The served pair's swap: leases keep the old pair open until its last request finishes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from service.errors import UnavailableError
from service.settings import Settings
from service.state import ServedPair, ServedState, model_candidates, read_served_record, write_served_record


class RecordingIndex:
    """Stands in for an opened index generation: only ``close`` matters to the state."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def pair(name: str) -> ServedPair:
    return ServedPair(artifact=None, index=RecordingIndex(), info={"name": "g", "generation": name}, model_path=Path(name))


def wait_closed(p: ServedPair, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not p.index.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    return p.index.closed


def test_no_pair_means_503_with_the_reason():
    state = ServedState(retry_after=7)
    state.problem = "index gallery cannot be opened"
    with pytest.raises(UnavailableError) as e:
        with state.lease():
            pass
    assert "cannot be opened" in str(e.value) and e.value.retry_after == 7


def test_in_flight_requests_finish_on_the_old_pair():
    state = ServedState()
    old, new = pair("old"), pair("new")
    state.swap(old)
    with state.lease() as during:
        state.swap(new)
        assert during is old and not old.index.closed  # still in use
        with state.lease() as after:
            assert after is new
    assert wait_closed(old)
    assert not new.index.closed


def test_an_idle_old_pair_closes_at_once_and_withdraw_closes_the_current():
    state = ServedState()
    a, b = pair("a"), pair("b")
    state.swap(a)
    state.swap(b)
    assert wait_closed(a)
    state.withdraw("index deleted")
    assert wait_closed(b)
    assert state.current is None and state.problem == "index deleted"


def test_served_record_and_model_candidates(tmp_path):
    settings = Settings(model=tmp_path / "orig", index="gallery", state_dir=tmp_path / "state")
    assert model_candidates(settings) == [tmp_path / "orig"]
    retrained = tmp_path / "state" / "models" / "20250101-000000-hysac"
    retrained.mkdir(parents=True)
    (retrained / "config.json").write_text("{}")
    (tmp_path / "state" / "models" / "20250101-000000-hysac.run").mkdir()  # a run dir is not an artifact
    write_served_record(settings.state_dir, model=retrained, index="gallery", generation="gallery@1")
    assert read_served_record(settings.state_dir)["generation"] == "gallery@1"
    assert model_candidates(settings) == [retrained, tmp_path / "orig"]
    other = settings.model_copy(update={"index": "other"})
    assert model_candidates(other) == [tmp_path / "orig", retrained]


# ------------------------------------------------------------------ a forced job's commit
def _services(tmp_path: Path, audit_dir: Path):
    from service.audit import AuditLog
    from service.state import Services

    settings = Settings(state_dir=tmp_path / "state")
    return Services(settings=settings, metrics=None, state=ServedState(), loader=None, batcher=None,
                    audit=AuditLog(audit_dir, max_bytes=1 << 20, keep=2), image_budget=None)


def _job(forced: bool):
    from service.admin.acceptance import retrieval_acceptance
    from service.jobs import JobRecord

    acceptance = retrieval_acceptance(61.0, 53.8, max_recall_drop=5 if forced else 10, force=True)
    return JobRecord(id="20250101-000000-000-abcdef", kind="retrain", plan={"swap": False, "new_model": "m"},
                     result={"retrieval": {"before": 61.0, "after": 53.8, "acceptance": acceptance}})


def test_a_forced_commit_is_audited_before_it_is_accepted(tmp_path):
    services = _services(tmp_path, tmp_path / "audit")
    assert services.job_succeeded(_job(forced=False))["swapped"] is False  # passed: no record of its own
    assert not (tmp_path / "audit" / "audit.jsonl").exists()
    assert services.job_succeeded(_job(forced=True)) == {"swapped": False, "model": "m", "index": None, "generation": None}
    records, _ = services.audit.read()
    assert [(r["job"], r["query"], r["token"], r["route"]) for r in records] == [
        ("20250101-000000-000-abcdef", {"forced": True, "misses": ["T->V R@1 fell 7.2 points (61.0 -> 53.8), 5 allowed"]},
         "admin", None)]


def test_a_forced_commit_that_cannot_be_audited_is_refused(tmp_path):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the audit directory should be")
    services = _services(tmp_path, blocked / "audit")
    with pytest.raises(UnavailableError, match="was not forced in"):
        services.job_succeeded(_job(forced=True))
