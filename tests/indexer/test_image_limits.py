"""``index build`` meets image bombs and huge files as recorded failures: the other images are indexed,
nothing crashes, and a file over the byte limit is refused from its size, never read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from indexer import builder, sources
from indexer.generations import LocalGenerations
from service.cli import app
from tests.helpers.indexer import write_images
from training.data.roots import DataRoots
from training.images import MAX_FILE_BYTES


def test_aspect_ratio_bombs_are_recorded_failures(tmp_path, art):
    folder = tmp_path / "photos"
    write_images(folder, 3)
    Image.new("L", (200_000, 1)).save(folder / "strip.png")
    Image.new("L", (1, 1_000_000)).save(folder / "tower.png")
    res = builder.build(LocalGenerations("col", tmp_path / "idx"), art, sources.folder_items(folder),
                        workers=1, progress=False, device="cpu")  # a real worker process decodes
    assert (res.summary.indexed, res.summary.failed, res.points) == (3, 2, 3)
    failures = {json.loads(line)["item"]: json.loads(line)["error"] for line in open(res.failures)}
    assert set(failures) == {str(folder / "strip.png"), str(folder / "tower.png")}
    assert all("aspect ratio" in why for why in failures.values())


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_a_huge_file_is_a_recorded_failure_before_it_is_read(tmp_path, art):
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    except OSError:
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    folder = tmp_path / "photos"
    write_images(folder, 2)
    with open(folder / "huge.png", "wb") as f:
        f.truncate(3 * 2**30)  # sparse: 3 GiB of zeros that take no disk
    before = peak_rss()
    # workers=0: the main process reads, so its own RSS would show a read of the file
    res = builder.build(LocalGenerations("col", tmp_path / "idx"), art, sources.folder_items(folder), workers=0,
                        progress=False, device="cpu", roots=DataRoots.of([tmp_path]))
    assert peak_rss() - before < 200 * 2**20  # reading it whole took 3 GiB
    assert (res.summary.indexed, res.summary.failed, res.points) == (2, 1, 2)
    (failure,) = [json.loads(line) for line in open(res.failures)]
    assert failure["item"] == str(folder / "huge.png")
    assert f"is {3 * 2**30:,} bytes, over the limit of {MAX_FILE_BYTES:,} bytes" in failure["error"]
    assert "--max-file-bytes" in failure["error"]


def test_max_file_bytes_of_index_build_and_add(tmp_path, art):
    folder = tmp_path / "photos"
    small, other = write_images(folder, 2)
    Image.new("RGB", (300, 300), "red").save(folder / "big.bmp")  # 270 kB: over the limit below
    limit = small.stat().st_size + other.stat().st_size + 1000
    root = tmp_path / "idx"
    runner = CliRunner()
    build = ["index", "build", "--model", str(art.path), "--name", "col", "--images", str(folder), "--root", str(root),
             "--no-progress", "--workers", "0", "--device", "cpu", "--max-file-bytes", str(limit), "--json"]
    out = runner.invoke(app, build)
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert (result["indexed"], result["failed"]) == (2, 1)
    (failure,) = [json.loads(line) for line in open(result["failures"])]
    assert failure["item"] == str(folder / "big.bmp") and f"over the limit of {limit:,} bytes" in failure["error"]
    out = runner.invoke(app, ["index", "add", "--model", str(art.path), "--name", "col", "--images", str(folder),
                              "--root", str(root), "--no-progress", "--workers", "0", "--device", "cpu",
                              "--max-file-bytes", str(10**6), "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert (result["indexed"], result["skipped"], result["failed"]) == (1, 2, 0)
