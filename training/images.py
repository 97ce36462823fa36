"""Opening untrusted image files and bytes: what decoding and preprocessing would cost, clear errors.

Two limits keep one request's cost bounded, both checked from the header before any pixel is decoded:

- ``max_pixels``: the decoded image itself (width x height).
- ``max_aspect``: the long side over the short side. CLIP preprocessing resizes the *short* side to the
  model's input size, so a 200,000 x 1 PNG of 103 bytes would become a 224 x 44,800,000 image (10 G pixels)
  before the centre crop; with the aspect bounded, the resized image is at most ``size**2 * max_aspect``
  pixels whatever the input.

Every failure of decoding, mode conversion or preprocessing is an ``ImageError`` (HTTP 400, a recorded
failure in ``index build``), never a MemoryError or OverflowError escaping as a 500.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Callable

from PIL import Image, UnidentifiedImageError

from training.errors import ImageError

#: Default decompression-bomb guard: images larger than this many pixels are refused.
MAX_PIXELS = 40_000_000
#: Default limit on long side / short side (what the short-side resize would blow up).
MAX_ASPECT = 50.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# what PIL, numpy and torchvision raise on odd modes, sizes and data; all mean "this image cannot be used"
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, EOFError, ZeroDivisionError,
                  MemoryError, OverflowError, RuntimeError)


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


def decode_image(data: bytes, *, name: str = "image", max_pixels: int = MAX_PIXELS,
                 max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Decode fully (so truncation is caught here, not later) and convert to RGB, within the limits."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            check_size(im.width, im.height, name=name, max_pixels=max_pixels, max_aspect=max_aspect)
            im.load()
            return im.convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name} is not a readable image ({e.__class__.__name__}); give a JPEG, PNG or WebP file") from e
    except _DECODE_ERRORS as e:
        raise ImageError(f"{name} is truncated or corrupt ({e.__class__.__name__}: {e}); re-export the image") from e


def preprocess_bytes(data: bytes, transform: Callable[[Image.Image], Any], *, name: str = "image",
                     max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> Any:
    """Decode ``data`` within the limits and apply the model's ``transform``: bytes -> ``(3, H, W)`` tensor."""
    image = decode_image(data, name=name, max_pixels=max_pixels, max_aspect=max_aspect)
    try:
        return transform(image)
    except _DECODE_ERRORS as e:
        raise ImageError(f"{name} could not be preprocessed ({e.__class__.__name__}); re-export it as an RGB JPEG or PNG") from e


def open_image(path: str | Path, *, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Read an image file; errors name the path."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise ImageError(f"image not found: {path}") from e
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e}") from e
    return decode_image(data, name=str(path), max_pixels=max_pixels, max_aspect=max_aspect)
