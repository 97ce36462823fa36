"""Opening untrusted image files and bytes: size and pixel limits, clear errors."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from training.errors import ImageError

#: Default decompression-bomb guard: images larger than this many pixels are refused.
MAX_PIXELS = 40_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def decode_image(data: bytes, *, name: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode fully (so truncation is caught here, not later) and convert to RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > max_pixels:
                raise ImageError(f"{name} has {im.width}x{im.height} pixels, over the limit of {max_pixels}; downscale it")
            im.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name} is not a readable image ({e.__class__.__name__}); give a JPEG, PNG or WebP file") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name} is truncated or corrupt ({e}); re-export the image") from e
    return im.convert("RGB")


def open_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read an image file; errors name the path."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise ImageError(f"image not found: {path}") from e
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e}") from e
    return decode_image(data, name=str(path), max_pixels=max_pixels)
