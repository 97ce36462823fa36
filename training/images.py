"""Opening untrusted image files and bytes: what decoding and preprocessing would cost, clear errors.

Three limits keep one image's cost bounded, all checked before any pixel is decoded:

- ``max_bytes`` (files only): the file's size, from ``fstat`` before reading, and at most ``max_bytes + 1``
  bytes are ever read (a sparse 3 GB ``huge.png`` costs nothing but a failure).
- ``max_pixels``: the decoded image itself (width x height), from the header.
- ``max_aspect``: the long side over the short side. CLIP preprocessing resizes the *short* side to the
  model's input size, so a 200,000 x 1 PNG of 103 bytes would become a 224 x 44,800,000 image (10 G pixels)
  before the centre crop; with the aspect bounded, the resized image is at most ``size**2 * max_aspect``
  pixels whatever the input.

Within those limits one image may still cost a few hundred MB (a 116 kB PNG of 6300 x 6300 zeros
decodes to 159 MB, and its RGB copy is as large). :func:`read_header` reads the header alone and
:func:`decoding_cost` says, from it, how much decoding, RGB conversion and the model's resize will
allocate: the service admits decodes against a memory budget with it before decoding anything.

Every failure of decoding, mode conversion or preprocessing is an ``ImageError`` (HTTP 400, a recorded
failure in ``index build``), never a MemoryError or OverflowError escaping as a 500.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image, UnidentifiedImageError

from training.data.roots import DataRoots
from training.errors import ImageError

#: Default decompression-bomb guard: images larger than this many pixels are refused.
MAX_PIXELS = 40_000_000
#: Default limit on long side / short side (what the short-side resize would blow up).
MAX_ASPECT = 50.0
#: Default limit on one image file's size (index builds, training data), checked before it is read.
MAX_FILE_BYTES = 64 * 2**20
#: Where the file limit is raised, named by the error.
FILE_LIMIT_HINT = "index build/add --max-file-bytes; SAFE_RETRIEVAL_JOB_MAX_FILE_BYTES for the service's jobs"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# what PIL, numpy and torchvision raise on odd modes, sizes and data; all mean "this image cannot be used"
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, EOFError, ZeroDivisionError,
                  MemoryError, OverflowError, RuntimeError)


# ------------------------------------------------------------------ what a decode costs
#: PIL's in-memory bytes per pixel by mode; every other mode (RGB, RGBA, LA, CMYK, YCbCr, I, F, ...) takes 4.
STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "BGR;15": 2, "BGR;16": 2,
                "BGR;24": 3}
#: Modes PIL converts to RGB in one step; the others go through an intermediate image (counted as 4 bytes/pixel).
DIRECT_TO_RGB = frozenset({"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr", "LAB",
                           "HSV", "I"})
#: What a format's decoder allocates beside the image, bytes per pixel: WebP decodes the whole frame into
#: its own RGBA buffer and hands PIL a copy (8.5 measured with Pillow 13, so 12 with a margin); libtiff may
#: read a whole RGBA raster; formats not listed are counted like TIFF. PNG, GIF and BMP decode line by line.
DECODER_BYTES = {"PNG": 0, "GIF": 0, "BMP": 0, "DIB": 0, "PPM": 0, "JPEG": 0, "MPO": 0, "WEBP": 12, "TIFF": 4}
OTHER_DECODER_BYTES = 4
#: A progressive JPEG keeps every DCT coefficient of the image: 2 bytes a sample, up to 4 components.
PROGRESSIVE_JPEG_BYTES = 8
#: The model's preprocessing after the resize (crop, RGB copy, uint8 array, float tensor, normalised tensor).
TENSOR_BYTES_PER_INPUT_PIXEL = 40
#: The largest model input side that :func:`max_decoding_cost` assumes by default (ViT-L/14-336 takes 336).
MAX_INPUT_SIDE = 448


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says (nothing decoded): its size, PIL mode and format."""

    width: int
    height: int
    mode: str
    format: str | None = None
    progressive: bool = False

    def cost(self, size: int) -> int:
        """:func:`decoding_cost` of this image for a model whose input side is ``size``."""
        return decoding_cost(self.width, self.height, self.mode, fmt=self.format, progressive=self.progressive,
                             size=size)


def decoding_cost(width: int, height: int, mode: str, *, fmt: str | None = None, progressive: bool = False,
                  size: int = 224) -> int:
    """Bytes that decoding, RGB conversion and preprocessing for a ``size``-pixel model allocate at most.

    An upper bound from the header alone, the sum of what is alive at some point (so a little more
    than the true peak): the decoded image (``STORED_BYTES`` per pixel), the decoder's own buffers
    (``DECODER_BYTES``), the RGB copy (4 bytes per pixel, twice when PIL converts through another
    mode), the short-side resize to ``size`` and the tensors made from the crop.
    """
    return (width * height * _bytes_per_pixel(mode, fmt, progressive) + _resize_bytes(width, height, size)
            + TENSOR_BYTES_PER_INPUT_PIXEL * size * size)


def max_decoding_cost(max_pixels: int, max_aspect: float, *, size: int = MAX_INPUT_SIDE) -> int:
    """An upper bound of :func:`decoding_cost` over every image within ``max_pixels`` and ``max_aspect``.

    ``max_pixels`` at the costliest bytes per pixel (a progressive CMYK JPEG, a WebP, an odd mode of an
    odd format), plus the resize of the most elongated accepted shape: with ``w <= max_aspect * h`` and
    ``w * h <= max_pixels`` the resize grows with the long side, which is at most ``sqrt(max_pixels * max_aspect)``.
    """
    per_pixel = max(_bytes_per_pixel(mode, fmt, prog) for mode, fmt, prog in
                    [("CMYK", "JPEG", True), ("RGBA", "WEBP", False), ("F", None, False)])
    long = math.ceil(math.sqrt(max_pixels * max_aspect))
    short = max(1, math.floor(long / max_aspect))
    return max_pixels * per_pixel + _resize_bytes(long, short, size) + TENSOR_BYTES_PER_INPUT_PIXEL * size * size


def _bytes_per_pixel(mode: str, fmt: str | None, progressive: bool) -> int:
    per_pixel = STORED_BYTES.get(mode, 4) + 4 + (0 if mode in DIRECT_TO_RGB else 4)
    per_pixel += DECODER_BYTES.get((fmt or "").upper(), OTHER_DECODER_BYTES)
    return per_pixel + (PROGRESSIVE_JPEG_BYTES if progressive else 0)


def _resize_bytes(width: int, height: int, size: int) -> int:
    # PIL resizes horizontally first: an intermediate of the new width by the old height, then the result
    scale = size / max(1, min(width, height))
    new_width, new_height = math.ceil(width * scale), math.ceil(height * scale)
    return 4 * new_width * (height + new_height)


# ------------------------------------------------------------------ opening and decoding
def check_size(width: int, height: int, *, name: str = "image", max_pixels: int = MAX_PIXELS,
               max_aspect: float = MAX_ASPECT) -> None:
    """Refuse an image by its header's size alone: no pixels, too many pixels, or too elongated."""
    if width < 1 or height < 1:
        raise ImageError(f"{name} has {width}x{height} pixels; give a non-empty image")
    if width * height > max_pixels:
        raise ImageError(f"{name} has {width}x{height} pixels, over the limit of {max_pixels}; downscale it")
    aspect = max(width, height) / min(width, height)
    if aspect > max_aspect:
        raise ImageError(f"{name} is {width}x{height} pixels, an aspect ratio of {aspect:.0f}:1 over the limit of "
                         f"{max_aspect:g}:1 (resizing its short side for the model would cost too much); "
                         f"crop or pad it")


@contextlib.contextmanager
def _image_errors(name: str) -> Iterator[None]:
    """Whatever PIL raises on a bad header or bad data becomes an ImageError naming the image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name} is not a readable image ({e.__class__.__name__}); give a JPEG, PNG or WebP file") from e
    except _DECODE_ERRORS as e:
        raise ImageError(f"{name} is truncated or corrupt ({e.__class__.__name__}: {e}); re-export the image") from e


def _open_checked(data: bytes, name: str, max_pixels: int, max_aspect: float) -> Image.Image:
    im = Image.open(io.BytesIO(data))  # lazy: reads the header, decodes nothing
    check_size(im.width, im.height, name=name, max_pixels=max_pixels, max_aspect=max_aspect)
    return im


def read_header(data: bytes, *, name: str = "image", max_pixels: int = MAX_PIXELS,
                max_aspect: float = MAX_ASPECT) -> ImageHeader:
    """The header of the image in ``data``, within the pixel and aspect limits; no pixel is decoded."""
    with _image_errors(name):
        im = _open_checked(data, name, max_pixels, max_aspect)
        fmt = im.format
        progressive = fmt in ("JPEG", "MPO") and bool(im.info.get("progressive") or im.info.get("progression"))
        return ImageHeader(im.width, im.height, im.mode, fmt, progressive)


def decode_image(data: bytes, *, name: str = "image", max_pixels: int = MAX_PIXELS,
                 max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Decode fully (so truncation is caught here, not later) and convert to RGB, within the limits."""
    with _image_errors(name):
        im = _open_checked(data, name, max_pixels, max_aspect)
        im.load()
        return im.convert("RGB")


def preprocess_bytes(data: bytes, transform: Callable[[Image.Image], Any], *, name: str = "image",
                     max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> Any:
    """Decode ``data`` within the limits and apply the model's ``transform``: bytes -> ``(3, H, W)`` tensor."""
    image = decode_image(data, name=name, max_pixels=max_pixels, max_aspect=max_aspect)
    try:
        return transform(image)
    except _DECODE_ERRORS as e:
        raise ImageError(f"{name} could not be preprocessed ({e.__class__.__name__}); re-export it as an RGB JPEG or PNG") from e


def file_too_large(path: str | Path, size: int, max_bytes: int, *, exact: bool = True) -> ImageError:
    """The error of an image file over ``max_bytes``: the file, its size, the limit and where to raise it."""
    return ImageError(f"image file {path} is {'' if exact else 'more than '}{size:,} bytes, over the limit of "
                      f"{max_bytes:,} bytes per image file; shrink it, or raise the limit ({FILE_LIMIT_HINT})")


def read_image_file(path: str | Path, *, max_bytes: int = MAX_FILE_BYTES,
                    roots: DataRoots = DataRoots()) -> tuple[bytes, Path]:
    """The bytes of the regular file ``path`` and the real path opened, never more than ``max_bytes``.

    The size is checked on the opened file before reading, and at most ``max_bytes + 1`` bytes are
    read (a file that grows meanwhile). Over the limit: ImageError. Outside ``roots``:
    OutsideRootsError; unreadable, missing or not a regular file: OSError (see :meth:`DataRoots.open`).
    """
    f, real, size = roots.open(path, what="image")
    with f:
        if size > max_bytes:
            raise file_too_large(path, size, max_bytes)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise file_too_large(path, max_bytes, max_bytes, exact=False)
    return data, real


def open_image(path: str | Path, *, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT,
               max_bytes: int = MAX_FILE_BYTES) -> Image.Image:
    """Read an image file (at most ``max_bytes``, checked before reading) and decode it; errors name the path."""
    try:
        data, _ = read_image_file(path, max_bytes=max_bytes)
    except FileNotFoundError as e:
        raise ImageError(f"image not found: {path}") from e
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror or e}") from e
    return decode_image(data, name=str(path), max_pixels=max_pixels, max_aspect=max_aspect)
