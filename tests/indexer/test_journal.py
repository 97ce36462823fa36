"""The journal of online changes: whole lines or nothing, its state, and the takedown list every build consults."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from indexer.generations import LocalGenerations
from indexer.journal import ADD, TAKEDOWN, Journal, append_line, read_entries, taken_down
from indexer.store import content_id
from service.cli import app
from tests.helpers.indexer import write_images


def test_the_state_follows_the_entries_and_survives_reopening(tmp_path):
    path = tmp_path / "c" / "journal.jsonl"
    j = Journal(path)
    j.append(ADD, id="a", kind="text", text="one")
    j.append(ADD, id="b", kind="text", text="two")
    j.append(TAKEDOWN, id="a", reason="r1", by="alice")
    j.append(TAKEDOWN, id="a", reason="r2", by="bob")  # the first takedown is the one kept
    j.append(ADD, id="a", kind="text", text="one")  # an add after a takedown does not bring it back
    j.close()
    again = Journal(path)
    assert set(again.adds) == {"b"} and set(again.takedowns) == {"a"} and again.takedowns["a"]["by"] == "alice"
    assert again.seq == 5 and [e["seq"] for e in read_entries(path)] == [1, 2, 3, 4, 5]
    assert taken_down(path) == frozenset({"a"}) and taken_down(tmp_path / "none.jsonl") == frozenset()
    assert taken_down(None) == frozenset()


def test_a_half_written_line_is_no_entry_and_is_cut_on_open(tmp_path):
    path = tmp_path / "journal.jsonl"
    Journal(path).append(TAKEDOWN, id="a", reason="r", by="x")
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"seq":2,"op":"takedown","id":"b","rea')  # a kill -9 mid-write
    assert [e["id"] for e in read_entries(path)] == ["a"] and taken_down(path) == {"a"}
    j = Journal(path)
    assert path.read_bytes() == whole  # cut at once, before any new write
    j.append(TAKEDOWN, id="c", reason="r", by="x")
    assert [e["id"] for e in read_entries(path)] == ["a", "c"]


def test_an_unreadable_line_is_skipped(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"seq":1,"op":"takedown","id":"a"}\nnot json\n["a list"]\n{"seq":2,"op":"other","id":"b"}\n'
                    '{"seq":3,"op":"takedown","id":"c"}\n')
    assert [e["id"] for e in read_entries(path)] == ["a", "c"]


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    """A write whose fsync fails (what a full disk may do) is cut back: the line the caller is told failed is not
    in the file. (The service's full-disk test fills a real tmpfs.)"""
    path = tmp_path / "f"
    path.write_bytes(b"kept\n")
    fd = os.open(path, os.O_RDWR | os.O_APPEND)

    def no_space(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    try:
        with pytest.raises(OSError, match="No space"):
            append_line(fd, b"lost\n", sync=True)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"kept\n"


def test_builds_skip_content_on_the_takedown_list(tmp_path, art):
    """``index build --takedowns JOURNAL``: listed images and texts are failures that say why, never points."""
    folder, root = tmp_path / "imgs", tmp_path / "idx"
    files = write_images(folder, 4)
    texts = tmp_path / "texts.txt"
    texts.write_text("a kept text\na taken-down text\n")
    journal = Journal(tmp_path / "journal.jsonl")
    for pid in (content_id(files[0].read_bytes()), content_id("a taken-down text")):
        journal.append(TAKEDOWN, id=pid, reason="r", by="admin")
    journal.close()
    art_dir = tmp_path / "model"
    from training import artifact

    artifact.save(art, art_dir)
    out = CliRunner().invoke(app, ["index", "build", "--model", str(art_dir), "--name", "col", "--root", str(root),
                                   "--images", str(folder), "--texts", str(texts), "--workers", "0", "--no-progress",
                                   "--device", "cpu", "--takedowns", str(tmp_path / "journal.jsonl"), "--json"])
    assert out.exit_code == 0, out.output
    gens = LocalGenerations("col", root)
    gen = gens.current()
    assert gens.read_meta(gen)["points"] == 3 + 1
    failures = [json.loads(line) for line in gens.failures_path(gen).read_text().splitlines()]
    assert sorted(f["kind"] for f in failures) == ["image", "text"]
    assert all("takedown list" in f["error"] for f in failures)
    assert str(files[0].name) in next(f["item"] for f in failures if f["kind"] == "image")
