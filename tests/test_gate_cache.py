"""The gate models' cache (tests/helpers/gates.py): a hit trains nothing, pruning keeps what is in use."""

from __future__ import annotations

import json
import os
import time

from tests.helpers import gates


def _entry(path, labels=("base",)):
    path.mkdir(parents=True)
    for label in labels:
        (path / label).mkdir()
    (path / gates.DONE).write_text(json.dumps({label: label for label in labels}))
    return path


def test_a_cached_entry_of_the_same_key_is_used_without_training(tmp_path):
    key = gates.cache_key()
    assert key == gates.cache_key() and len(key) == 20  # a pure function of the code and the versions
    _entry(tmp_path / key, ("base", "hysac"))
    background = gates.Background(cache=tmp_path)
    assert background.cached and background.proc is None
    assert background.wait() == {"base": tmp_path / key / "base", "hysac": tmp_path / key / "hysac"}
    background.stop()
    assert (tmp_path / key / gates.DONE).is_file()  # stopping never deletes a cache entry


def test_pruning_keeps_the_newest_entries_and_running_trainings(tmp_path):
    old, older, current = _entry(tmp_path / "old"), _entry(tmp_path / "older"), _entry(tmp_path / "current")
    os.utime(older, (time.time() - 200, time.time() - 200))
    os.utime(old, (time.time() - 100, time.time() - 100))
    running = tmp_path / f"{gates.TRAINING}{os.getpid()}-x"
    dead = tmp_path / f"{gates.TRAINING}999999999-x"
    running.mkdir()
    dead.mkdir()
    gates._prune(tmp_path, current)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["current", "old", running.name])
