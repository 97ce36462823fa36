"""``index build`` meets image bombs as recorded failures: the other images are indexed, nothing crashes."""

from __future__ import annotations

import json

from PIL import Image

from indexer import builder, sources
from indexer.generations import LocalGenerations
from tests.helpers.indexer import write_images


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
