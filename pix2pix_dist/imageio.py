"""Reading one user image safely: regular files only, bounded pixels, 16-bit aware.

`load_rgb` either returns uint8 RGB pixels or raises `Skip` with a short reason the caller counts
(`not_regular`, `too_large`, `unreadable`). Nothing here can block (a FIFO is refused before it
is read), decode more pixels than asked for (the header is checked first), or turn a 16-bit
grayscale PNG into near-white (PIL clips `I;16` values at 255 when converting to RGB).
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000
"""Larger images are skipped as `too_large` (a 24 MP photo is well inside; a 13000x13000
palette PNG that decodes to 0.5 GB is not)."""
_WIDE_GRAY = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class Skip(Exception):
    """An input that is skipped and counted; `reason` is the count's name, str() the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def load_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, EXIF-oriented, possibly read-only (copies of a
    large photo are what this module avoids); raises Skip."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise Skip("unreadable", exc.strerror or str(exc)) from None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Skip("not_regular", "not a regular file")
        try:
            with warnings.catch_warnings():
                # Our own bound replaces PIL's decompression-bomb warning (an error above 2x).
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    width, height = im.size
                    if width * height > max_pixels:
                        raise Skip("too_large", f"{width}x{height} pixels is over --max-pixels "
                                                f"{max_pixels}")
                    ImageOps.exif_transpose(im, in_place=True)  # no copy when upright
                    return to_rgb(im)
        except Image.DecompressionBombError as exc:
            raise Skip("too_large", str(exc).splitlines()[0]) from None
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise Skip("unreadable", (str(exc).splitlines() or [type(exc).__name__])[0]) from None


def to_rgb(im: Image.Image) -> np.ndarray:
    """uint8 RGB pixels of a decoded image; 16/32-bit grayscale is scaled, not clipped."""
    if im.mode in _WIDE_GRAY:
        # 0..65535 -> 0..255 with rounding; "I" images from 16-bit files hold the same range.
        wide = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
