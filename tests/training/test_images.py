"""``training.images``: the limits are read from the header, and every decode failure is an ImageError."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from training import architectures
from training.errors import ImageError
from training.images import check_size, decode_image, preprocess_bytes


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
