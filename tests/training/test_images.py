"""``training.images``: the limits are read from the header (the file's size before reading it), what a
decode costs is known from the header, and every decode failure is an ImageError."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from training import architectures
from training.data.roots import DataRoots
from training.errors import ImageError
from training.images import (
    MAX_FILE_BYTES,
    check_size,
    decode_image,
    decoding_cost,
    max_decoding_cost,
    open_image,
    preprocess_bytes,
    read_header,
    read_image_file,
)


def png(size: tuple[int, int], mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("size", "words"), [
    ((200_000, 1), "aspect ratio of 200000:1"),
    ((1, 60), "aspect ratio of 60:1"),
    ((7000, 7000), "over the limit of 40000000"),
])
def test_limits_refuse_by_the_header(size, words):
    with pytest.raises(ImageError, match=words):
        check_size(*size)


def test_limits_are_keyword_options():
    check_size(1000, 10, max_aspect=100)
    with pytest.raises(ImageError, match="over the limit of 99"):
        check_size(10, 10, max_pixels=99)


def test_preprocessing_within_limits_gives_the_models_input():
    transform = architectures.build_transform(architectures.resolve("tiny"))
    size = architectures.resolve("tiny").preprocess["size"]
    for shape, mode in [((500, 10), "L"), ((3, 3), "I;16"), ((40, 30), "CMYK"), ((8, 8), "P")]:
        buf = io.BytesIO()
        Image.new(mode, shape).save(buf, "TIFF")
        pixels = preprocess_bytes(buf.getvalue(), transform)
        assert isinstance(pixels, torch.Tensor) and pixels.shape == (3, size, size)


def test_every_decode_failure_is_an_image_error():
    whole = png((64, 64), "RGB")
    for data in (b"", b"GIF89a", whole[: len(whole) // 2], b"\x89PNG\r\n\x1a\n" + b"\x00" * 40):
        with pytest.raises(ImageError):
            decode_image(data)


# ------------------------------------------------------------------ file sizes
def test_open_image_refuses_a_huge_file_from_its_size(tmp_path):
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(3 * 2**30)  # sparse: reading it would take 3 GiB
    with pytest.raises(ImageError) as e:
        open_image(huge)
    words = (str(huge), f"{3 * 2**30:,} bytes", f"limit of {MAX_FILE_BYTES:,} bytes", "--max-file-bytes")
    assert all(w in str(e.value) for w in words), str(e.value)
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(small)
    assert open_image(small).size == (40, 30)
    with pytest.raises(ImageError, match="over the limit of 10 bytes"):
        open_image(small, max_bytes=10)


def test_a_file_that_grew_after_its_size_was_read_is_cut_at_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "growing.png"
    path.write_bytes(b"\x89PNG" + b"\0" * 5000)
    opened = DataRoots.open

    def stale_size(self, p, *, what="file"):
        f, real, _ = opened(self, p, what=what)
        return f, real, 10  # as if the file had been small when it was opened

    monkeypatch.setattr(DataRoots, "open", stale_size)
    with pytest.raises(ImageError, match="more than 1,000 bytes"):
        read_image_file(path, max_bytes=1000)


def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    with pytest.raises(ImageError, match="not a regular file"):
        open_image(fifo)
    with pytest.raises(ImageError, match="image not found"):
        open_image(tmp_path / "missing.png")


# ------------------------------------------------------------------ what a decode costs
def encoded(mode: str, size: tuple[int, int], fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, fmt, **options)
    return buf.getvalue()


def test_the_header_gives_the_cost_without_decoding():
    header = read_header(encoded("RGB", (3000, 2000), "PNG"))
    assert (header.width, header.height, header.mode, header.format) == (3000, 2000, "RGB", "PNG")
    decoded = 3000 * 2000 * 4  # PIL keeps RGB as 4 bytes a pixel; the RGB copy takes as much again
    assert 2 * decoded <= header.cost(224) <= 2 * decoded + 8 * 2**20
    with pytest.raises(ImageError, match="aspect ratio"):
        read_header(encoded("L", (200_000, 1), "PNG"))


def test_costs_follow_mode_format_and_shape():
    rgb = decoding_cost(3000, 2000, "RGB", fmt="PNG")
    assert decoding_cost(3000, 2000, "L", fmt="PNG") < rgb  # 1 byte a pixel, then the RGB copy
    assert decoding_cost(3000, 2000, "RGB", fmt="JPEG", progressive=True) > decoding_cost(3000, 2000, "RGB", fmt="JPEG")
    assert decoding_cost(3000, 2000, "RGB", fmt="WEBP") > rgb  # libwebp's own frame buffer
    assert decoding_cost(3000, 2000, "F", fmt="TIFF") > decoding_cost(3000, 2000, "I", fmt="TIFF")  # F -> L -> RGB
    assert decoding_cost(50_000, 1000, "L", size=224) > decoding_cost(7071, 7071, "L", size=224)  # the resize
    header = read_header(encoded("RGB", (64, 48), "JPEG", progressive=True))
    assert header.progressive and header.format == "JPEG"


def accepted_shapes(max_pixels: int, max_aspect: int):
    """``(w, h)`` within ``max_pixels`` and ``max_aspect``, either way round."""
    def heights(w: int):
        low = max(1, -(-w // max_aspect))
        return st.integers(low, max(low, min(max_aspect * w, max_pixels // w)))  # empty ranges: filtered below

    long = int((max_pixels * max_aspect) ** 0.5)
    return st.integers(1, long).flatmap(lambda w: st.tuples(st.just(w), heights(w))).filter(
        lambda wh: wh[0] * wh[1] <= max_pixels and max(wh) <= max_aspect * min(wh)).flatmap(
        lambda wh: st.sampled_from([wh, wh[::-1]]))


@settings(max_examples=300, deadline=None)
@given(shape=accepted_shapes(40_000_000, 50), size=st.sampled_from([64, 224, 336, 448]),
       kind=st.sampled_from([("RGB", "PNG", False), ("L", "PNG", False), ("I;16", "TIFF", False), ("F", "TIFF", False),
                             ("CMYK", "JPEG", True), ("RGBA", "WEBP", False), ("P", "GIF", False), ("LA", None, False)]))
def test_no_accepted_image_costs_more_than_the_maximum(shape, size, kind):
    (w, h), (mode, fmt, progressive) = shape, kind
    assert decoding_cost(w, h, mode, fmt=fmt, progressive=progressive, size=size) <= max_decoding_cost(
        40_000_000, 50.0, size=448)
    extreme = (44_700, 894)  # the longest accepted side (50:1, 40 Mpx): the costliest resize
    assert decoding_cost(*extreme, "CMYK", fmt="JPEG", progressive=True, size=448) <= max_decoding_cost(
        40_000_000, 50.0, size=448)


MEASURE = r"""
import ctypes, io, json, sys
from pathlib import Path
ctypes.CDLL(None).mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: every large block is fresh, so the peak shows it
from PIL import Image
from training.images import decode_image, read_header
out = {}
for mode, fmt, opts in json.loads(sys.argv[1]):
    buf = io.BytesIO()
    Image.effect_noise((1200, 800), 64).convert(mode).save(buf, fmt, **opts)
    data = buf.getvalue()
    decode_image(data[:0] + data).resize((8, 8))  # warm up the plugin
    Path("/proc/self/clear_refs").write_text("5")
    base = int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) * 1024
    rgb = decode_image(data)
    short = min(rgb.size)
    rgb.resize((rgb.width * 224 // short, rgb.height * 224 // short), Image.BICUBIC)
    del rgb
    peak = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
    out[f"{mode} {fmt} {opts}"] = [peak - base, read_header(data).cost(224)]
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and calls glibc's mallopt")
def test_the_estimate_covers_what_pillow_allocates():
    cases = [("RGB", "PNG", {}), ("L", "PNG", {}), ("RGB", "JPEG", {"progressive": True}), ("RGB", "WEBP", {}),
             ("P", "GIF", {})]
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[2])
    if proc.returncode != 0 and "clear_refs" in proc.stderr:
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout)
    assert len(measured) == len(cases)
    for case, (peak, estimate) in measured.items():
        assert peak <= estimate, f"{case}: decoding took {peak} bytes, estimated {estimate}"
        assert peak > 1200 * 800 * 4, f"{case}: nothing measured ({peak} bytes)"  # the check itself works
