"""One image in, one training-ready JPEG (or a reason to skip it) out.

Everything here is a pure function of the file's bytes and the settings, so the shard writer can
run it in any worker process, in any order, and still produce byte-identical shards.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..imageio import Skip, open_bounded

# Modes that carry no colour at all: rejected from the header, before decoding any pixel.
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
# SOF markers whose bytes we keep: baseline (C0) and extended sequential (C1) Huffman. The
# hardware JPEG decoder of A100/H100 (nvJPEG's hardware backend) only takes these; progressive
# (C2), arithmetic-coded and lossless JPEGs would fall back to slow decoding, so they are re-encoded.
PASSTHROUGH_SOF = {0xC0, 0xC1}
EXIF_ORIENTATION = 0x0112
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")


@dataclass(frozen=True)
class ImageSettings:
    min_size: int = 64
    """Shorter side (pixels) below which an image is dropped."""
    resize: int | None = None
    """Downscale so that the shorter side is this many pixels; None keeps the size."""
    quality: int = 95
    """JPEG quality for images that must be re-encoded."""
    gray_tolerance: int = 10
    """A pixel counts as coloured when max(R,G,B) - min(R,G,B) exceeds this (0..255)."""
    gray_fraction: float = 0.01
    """An image is grayscale when at most this share of its pixels are coloured."""
    max_bytes: int = 64_000_000
    """Files larger than this (as listed) are skipped unread: zip bombs, huge scans."""
    max_pixels: int = 50_000_000
    """Images with more pixels (width x height, from the header) are skipped undecoded."""


@dataclass(frozen=True)
class Converted:
    jpeg: bytes
    meta: dict[str, Any]


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str = ""


def _looks_like_text(data: bytes) -> bool:
    head = data[:1024]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character may be cut at 1024 bytes: allow a few trailing bytes.
        try:
            head[:-4].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return not any(b < 9 or 13 < b < 32 for b in head)


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | str | None:
    """Walk a JPEG's marker segments (headers only) up to its frame header: (SOF marker, sample
    precision, components), "truncated" when the data ends first, None when it is not a JPEG or
    has no frame header before its scan."""
    n = len(data)
    if n < 2 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while True:
        if i + 2 > n:
            return "truncated"
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no frame header before it
            return None
        if i + 4 > n:
            return "truncated"
        length = (data[i + 2] << 8) | data[i + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return (marker, data[i + 4], data[i + 9]) if i + 10 <= n else "truncated"
        i += 2 + length


def jpeg_sof(data: bytes) -> tuple[int, int, int] | None:
    """(SOF marker, sample precision, components) of a JPEG, or None when no frame header is found.

    PIL does not expose the frame type directly; walking the marker segments is cheap (headers
    only) and tells us whether the original bytes are safe to keep as they are.
    """
    frame = _jpeg_frame(data)
    return frame if isinstance(frame, tuple) else None


def is_grayscale(im: Image.Image, tolerance: int, fraction: float) -> bool:
    """True when (nearly) every pixel has R == G == B.

    Works on a small copy: colour cast is a global property, and a box reduction averages JPEG
    chroma noise away instead of mistaking it for colour.
    """
    factor = max(1, max(im.size) // 128)
    small = im.reduce(factor) if factor > 1 else im
    a = np.asarray(small, dtype=np.int16)
    spread = a.max(axis=2) - a.min(axis=2)
    return int(np.count_nonzero(spread > tolerance)) <= fraction * spread.size


def _to_rgb(im: Image.Image, changes: list[str]) -> Image.Image:
    """Convert any colour mode to RGB; transparency is composited on white (not black: a cut-out
    object on black would teach the model that backgrounds are black)."""
    if im.mode == "RGB":
        return im
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        changes.append("alpha_on_white")
        return Image.alpha_composite(white, im).convert("RGB")
    changes.append(f"{im.mode.lower().replace(';', '')}_to_rgb")
    return im.convert("RGB")


def _target_size(w: int, h: int, short: int) -> tuple[int, int]:
    if w <= h:
        return short, max(1, round(h * short / w))
    return max(1, round(w * short / h)), short


def convert_image(data: bytes, settings: ImageSettings) -> Converted | Rejected:
    """Validate and convert one encoded image. Never raises for bad input: returns Rejected."""
    if not data:
        return Rejected("empty")
    with warnings.catch_warnings():
        # Huge images only warn below PIL's bomb limit; above it we get an exception (handled).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return _convert(data, settings)
        except Skip as e:  # over --max-pixels, from the header
            return Rejected(e.reason, str(e))
        except UnidentifiedImageError:
            if _jpeg_frame(data) == "truncated":  # cut inside its headers: not a format problem
                return Rejected("truncated", "file ends inside the JPEG header")
            if data.startswith(_IMAGE_MAGIC) or data[8:12] == b"WEBP":
                # An image format PIL knows, in a variant it cannot read (e.g. float64 TIFF).
                return Rejected("unsupported", "image format variant PIL cannot read")
            return Rejected("not_an_image" if _looks_like_text(data) else "corrupt", "unknown format")
        except OSError as e:
            truncated = any(phrase in str(e).lower() for phrase in ("truncated", "premature end"))
            return Rejected("truncated" if truncated else "corrupt", str(e))
        except (ValueError, TypeError, SyntaxError, IndexError, KeyError, EOFError, MemoryError) as e:
            # PIL's plugins raise all of these on malformed headers.
            return Rejected("corrupt", f"{type(e).__name__}: {e}")


def _convert(data: bytes, s: ImageSettings) -> Converted | Rejected:
    im = open_bounded(io.BytesIO(data), s.max_pixels)
    fmt, mode = im.format or "?", im.mode
    w, h = im.size
    # Cheap checks first, from the header alone.
    if min(w, h) < s.min_size:
        return Rejected("too_small", f"{w}x{h}")
    if mode in GRAY_MODES:
        return Rejected("grayscale", f"mode {mode}")
    try:
        orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block is not worth dropping the photo for
        orientation = 1
    if orientation not in range(1, 9):
        orientation = 1
    needs_resize = s.resize is not None and min(w, h) > s.resize
    sof = jpeg_sof(data) if fmt == "JPEG" else None
    passthrough = (
        fmt == "JPEG" and mode == "RGB" and sof is not None and sof[0] in PASSTHROUGH_SOF
        and sof[1] == 8 and sof[2] == 3 and orientation == 1 and not needs_resize
    )
    meta: dict[str, Any] = {"format": fmt, "mode": mode, "orig_width": w, "orig_height": h}
    if orientation != 1:
        meta["exif_orientation"] = orientation

    if passthrough:
        # Decode at 1/8 scale with libjpeg's DCT scaling: every entropy-coded byte is still
        # parsed (so truncation/corruption is caught) but the grayscale check costs ~1/20.
        im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        im.load()
        if is_grayscale(im, s.gray_tolerance, s.gray_fraction):
            return Rejected("grayscale", "R=G=B")
        meta.update(width=w, height=h, reencoded=False, changes=[])
        return Converted(data, meta)

    changes: list[str] = []
    if fmt == "JPEG" and needs_resize:
        # Let libjpeg skip detail we would throw away anyway, keeping >= 2x the target size so
        # the Lanczos filter below still sees enough pixels for a sharp, alias-free result.
        tw, th = _target_size(w, h, s.resize)  # type: ignore[arg-type]
        im.draft(im.mode, (2 * tw, 2 * th))
    im.load()
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
        changes.append("exif_orientation")
    im = _to_rgb(im, changes)
    if is_grayscale(im, s.gray_tolerance, s.gray_fraction):
        return Rejected("grayscale", "R=G=B")
    if needs_resize:
        im = im.resize(_target_size(*im.size, s.resize), Image.Resampling.LANCZOS)  # type: ignore[arg-type]
        changes.append("resize")
    if fmt != "JPEG":
        changes.append("to_jpeg")
    elif sof is None or sof[0] not in PASSTHROUGH_SOF:
        changes.append("to_baseline")  # progressive, arithmetic-coded, lossless...
    elif not changes:
        changes.append("jpeg_variant")  # e.g. 12-bit or an odd component count
    out = io.BytesIO()
    # Baseline (PIL's default, not progressive): see PASSTHROUGH_SOF.
    # No EXIF/ICC is copied: orientation is already applied, so readers must not rotate again.
    im.save(out, "JPEG", quality=s.quality)
    meta.update(width=im.width, height=im.height, reencoded=True, changes=changes)
    return Converted(out.getvalue(), meta)
