"""The `index` and `search` commands end to end: a build killed with -9, its resume, search, info, errors.

The killed build, `info`, `list` and the error cases run the real console script in a subprocess;
the resumed build and the search run the same typer app in-process (CliRunner), which saves two
interpreter starts with torch and open_clip (the suite's time budget is tight on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from typer.testing import CliRunner

from indexer.errors import IndexNotFoundError
from indexer.generations import GEN_RE, LocalGenerations
from indexer.index import open_index
from indexer.store import content_id
from service.cli import app
from tests.helpers.cli import CLI
from tests.helpers.indexer import leaked, leaky_root, write_images


def progress_of(root):
    """Counters of the build in progress (progress.json of the partial generation), or None."""
    d = root / "col"
    for g in (sorted(d.iterdir()) if d.is_dir() else []):
        p = g / "progress.json"
        if GEN_RE.match(g.name) and p.is_file():
            try:
                return json.loads(p.read_text())
            except json.JSONDecodeError:  # replaced while we read; try again
                return None
    return None


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d))
    return out


def test_killed_build_resumes_to_the_same_points_then_search(tmp_path, art, cli):
    """``kill -9`` of the build alone: its DataLoader worker dies with it (within 2 s), and the build resumes."""
    folder, root = tmp_path / "imgs", tmp_path / "idx"
    files = write_images(folder, 40)
    args = ["index", "build", "--model", str(art.path), "--name", "col", "--images", str(folder), "--root", str(root),
            "--batch-size", "2", "--workers", "1", "--no-progress"]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([CLI, *args], stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline, at_kill = time.monotonic() + 240, None
        while time.monotonic() < deadline and proc.poll() is None:
            p = progress_of(root)
            if p and p["indexed"] >= 6:
                workers = [pid for pid in group_members(proc.pid) if pid != proc.pid]
                os.kill(proc.pid, signal.SIGKILL)  # the build only, as an OOM killer or an operator would
                at_kill = p
                break
            time.sleep(0.005)
        proc.wait(timeout=30)
        gone_by = time.monotonic() + 2.0
        while group_members(proc.pid) and time.monotonic() < gone_by:
            time.sleep(0.05)
        survivors = group_members(proc.pid)
        if survivors:
            os.killpg(proc.pid, signal.SIGKILL)
    assert at_kill is not None and not at_kill["done"], (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == -signal.SIGKILL
    assert workers and survivors == [], f"DataLoader workers {survivors} outlived the killed build"
    with pytest.raises(IndexNotFoundError):  # nothing half-built is ever served
        open_index("col", root=root)

    # the same command again, in-process through the real CLI code
    out = CliRunner().invoke(app, [*args, "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    assert res["resumed"] and res["skipped"] >= at_kill["indexed"] and res["failed"] == 0
    assert res["indexed"] + res["skipped"] == 40 and res["points"] == 40
    with open_index("col", root=root) as idx:
        ids = list(idx.store.iter_ids())
    assert len(ids) == len(set(ids)) == 40 and set(ids) == {content_id(f.read_bytes()) for f in files}

    out = CliRunner().invoke(app, ["search", "--index", "col", "--root", str(root), "--model", str(art.path),
                                   "--image", str(files[5]), "--k", "3", "--safety", "off", "--json"])
    assert out.exit_code == 0, out.output
    found = json.loads(out.stdout)
    assert found["index"]["generation"] == res["generation"] and len(found["results"]) == 3  # as the API names them
    top = found["results"][0]
    assert top["uri"] == files[5].relative_to(folder).as_posix() and top["distance"] < 1e-2
    assert found["query"]["distance_to_origin"] > 0 and found["query"]["threshold"] == 1.5

    info = json.loads(cli("index", "info", "col", "--root", root).stdout)
    assert info["current"] == res["generation"] and info["points"] == 40 and info["fingerprint"] == art.fingerprint
    assert info["thresholds"] == {"text": 1.5, "image": 1.5} and info["geometry"] == "lorentz"
    listed = json.loads(cli("index", "list", "--root", root, "--json").stdout)
    assert [(r["name"], r["points"]) for r in listed] == [("col", 40)]
    assert "dropped col" in cli("index", "drop", "col", "--root", root, "--yes").stdout
    assert json.loads(cli("index", "list", "--root", root, "--json").stdout) == []


def test_busy_index_and_bad_input_fail_fast_with_clear_messages(tmp_path, art, cli):
    folder, root = tmp_path / "imgs", tmp_path / "idx"
    write_images(folder, 2)
    build = ["index", "build", "--model", art.path, "--name", "col", "--root", root, "--no-progress"]
    with LocalGenerations("col", root).lock():
        busy = cli(*build, "--images", folder, check=False)
    assert busy.returncode == 2 and "is being built by another job" in busy.stderr and "Traceback" not in busy.stderr
    assert not LocalGenerations("col", root).generations()
    cases = [
        ([*build, "--images", tmp_path / "nope"], "image folder not found"),
        ([*build, "--manifest", tmp_path / "nope.csv"], "manifest not found"),
        (["index", "build", "--model", art.path, "--name", "a/b", "--images", folder, "--root", root], "invalid index name"),
        (["search", "--index", "col", "--model", art.path, "--text", "x", "--root", root], "does not exist"),
        (["index", "info", "col", "--root", root], "no index named col"),
    ]
    for args, message in cases:
        proc = cli(*args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_data_roots_and_malformed_manifests_through_the_cli(tmp_path, art, cli):
    leaky, root = leaky_root(tmp_path), tmp_path / "idx"
    build = ["index", "build", "--model", art.path, "--name", "col", "--root", root, "--no-progress", "--workers", "0"]
    confined = ["--data-root", leaky.root, "--media-root", leaky.root]
    proc = cli(*build, *confined, "--manifest", leaky.manifest, "--captions-as-text", "--json")
    res = json.loads(proc.stdout)
    assert (res["indexed"], res["failed"], res["points"]) == (2, 7, 2) and "Traceback" not in proc.stderr
    failures = [json.loads(line) for line in open(res["failures"])]
    assert {"item": f"{leaky.manifest}:5", "error": "the row is a list, not an object; fix or remove that row"} in [
        {k: f[k] for k in ("item", "error")} for f in failures]
    assert sum("outside the data roots" in f["error"] for f in failures) == 6
    with open_index("col", root=root) as idx:
        payloads = [p.payload for p in idx.store.retrieve(list(idx.store.iter_ids()))]
    assert len(payloads) == 2 and not leaked(payloads, leaky)

    # whole-file problems: one clear line, exit 2, no traceback, nothing built
    (leaky.root / "latin.csv").write_bytes("image,caption\nimgs/img001.png,caf\xe9\n".encode("latin-1"))
    (leaky.root / "noimage.csv").write_text("path,caption\nimgs/img001.png,x\n")
    (leaky.root / "loop").symlink_to(leaky.root / "loop")
    cases = [
        (["--manifest", leaky.root / "latin.csv"], "is not UTF-8 text"),
        (["--manifest", leaky.root / "noimage.csv"], "has no 'image' column"),
        (["--texts", leaky.root / "texts.txt", *confined], "outside the data roots"),
        (["--manifest", leaky.root / "link.jsonl", *confined], "outside the data roots"),
        (["--images", leaky.root / ("x" * 300), *confined], "File name too long"),
        (["--images", leaky.root / "imgs", "--media-root", leaky.root / "loop"], "cannot be resolved"),
        (["--images", leaky.root / "imgs", "--data-root", leaky.root / "nope"], "is not a directory"),
    ]
    before = LocalGenerations("col", root).generations()
    for args, message in cases:
        proc = cli(*build, *args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (args, proc.stderr)
        assert message in lines[0] and "Traceback" not in proc.stdout + proc.stderr, (args, proc.stderr)
    assert LocalGenerations("col", root).generations() == before


def test_no_switch_stages_and_reports_the_generation_in_the_result_file(tmp_path, art):
    from indexer import builder, sources

    folder, root = tmp_path / "imgs", tmp_path / "idx"
    files = write_images(folder, 3)
    gens = LocalGenerations("col", root)
    served = builder.build(gens, art, sources.folder_items(folder), workers=0, progress=False, media_root=folder)
    out = CliRunner().invoke(app, ["index", "delete", "--name", "col", "--root", str(root), "--id",
                                   content_id(files[0].read_bytes()), "--no-switch", "--result-file",
                                   str(tmp_path / "r" / "result.json")])
    assert out.exit_code == 0, out.output
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["state"] == "complete" and result["switched"] is False and result["removed"] == 1
    assert result["generation"] != served.generation and result["points"] == 2
    assert gens.current() == served.generation  # staged, not switched: the served generation is untouched
    assert (root / "col" / "CURRENT").read_text().strip() == served.generation
    assert gens.read_meta(served.generation)["points"] == 3


def test_help_text_keeps_its_brackets():
    """Help is literal text: "[caption]" once vanished as rich markup ("image, , , extra columns")."""
    out = CliRunner().invoke(app, ["index", "build", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "image, [caption], [tags], extra columns" in " ".join(out.output.split())
