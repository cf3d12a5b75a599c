"""Reading one user image safely: regular files only, bounded pixels, 16-bit aware.

`load_image` either returns the decoded image (`to_rgb` gives its uint8 RGB pixels) or raises
`Skip` with a short reason the caller counts (`not_a_file`, `too_large`, `unreadable`). Nothing here can block (a FIFO is refused before it
is read), decode more pixels than asked for (the header is checked first), or turn a 16-bit
grayscale PNG into near-white (PIL clips `I;16` values at 255 when converting to RGB).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .files import NotRegularFile, open_regular

NOT_A_FILE = "not_a_file"
"""The skip reason of FIFOs, sockets and devices (never read: a FIFO would block forever)."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
"""File endings taken as images, by the shard writer and by colorize (case-insensitive)."""
DEFAULT_MAX_PIXELS = 70_000_000
"""colorize's default limit: larger images are skipped as `too_large` (a 56 MP photo is inside;
a 9990x9990 palette PNG is not). It keeps colorize under 1.5 GB peak with unet_256 (README,
"Colorizing photos": base ~1.1 GB + 4-5 bytes per pixel). The shard writer, with one decoder
per core, sets a lower one of its own."""
_WIDE_GRAY = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def is_hidden(name: str) -> bool:
    """A file or folder name that is never read as input, by the shard writer or by colorize:
    dotfiles (including macOS '._photo.jpg' AppleDouble junk, which has an image extension)
    and __MACOSX folders."""
    return name.startswith(".") or name == "__MACOSX"


def has_image_ext(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def find_image_files(root: Path, exclude: Path | None = None
                     ) -> tuple[list[tuple[str, Path]], list[str]]:
    """Every file below `root` with an image extension, as (path relative to `root`,
    '/'-separated; path), sorted by the relative path, and the subfolders that could not be
    listed ('a/b/'). Raises OSError when `root` itself cannot be listed.

    The one search rule of the shard writer and colorize: hidden names are skipped; symbolic
    links to folders are followed (datasets are often linked in), each folder once, so a cycle
    ends; a folder that can also be reached without a link keeps that name (`latest -> 2024` is
    not followed); a folder below `root` that is `exclude` (colorize's --output) is not
    searched. Entries are visited in name order, so which of two links to one outside folder is
    followed never depends on the file system's listing order."""
    def folder_id(path: str | Path) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    @functools.cache
    def direct() -> set[tuple[int, int] | None]:
        """The folders reachable without following a link: a second listing of the tree, made
        only when a link to a folder is met (most datasets have none)."""
        found = {folder_id(root)}
        for folder, dirs, _ in os.walk(root):
            dirs[:] = [d for d in dirs if not is_hidden(d)]
            found.update(folder_id(os.path.join(folder, d)) for d in dirs
                         if not os.path.islink(os.path.join(folder, d)))
        found.discard(None)
        return found

    excluded = folder_id(exclude) if exclude is not None else None
    seen: set[tuple[int, int]] = set()
    files: list[tuple[str, Path]] = []
    unreadable: list[str] = []
    stack = [(str(root), "")]
    while stack:
        folder, prefix = stack.pop()
        fid = folder_id(folder)
        if fid in seen or (prefix and fid is not None and fid == excluded):
            continue
        if fid is not None:
            seen.add(fid)  # each folder once
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except OSError:
            if not prefix:
                raise
            unreadable.append(prefix)
            continue
        for e in entries:  # reversed: the stack pops them in name order
            if is_hidden(e.name):
                continue
            try:
                is_dir = e.is_dir()  # follows a link; False for a dangling one
            except OSError:
                is_dir = False
            if is_dir:
                if not (e.is_symlink() and folder_id(e.path) in direct()):
                    stack.append((e.path, f"{prefix}{e.name}/"))
            elif has_image_ext(e.name):
                files.append((f"{prefix}{e.name}", Path(e.path)))
    return sorted(files, key=lambda item: item[0]), sorted(unreadable)


def display_name(relpath: str) -> str:
    """A file name as it can be printed and stored in JSON: bytes that are not UTF-8 as \\xNN,
    control characters (a newline in a name...) escaped, so one name stays on one line."""
    text = relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def first_line(exc: BaseException) -> str:
    """An exception's message as one line: its first non-blank line, or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Skip(Exception):
    """An input that is skipped and counted; `reason` is the count's name, str() the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS,
               before_decode: Callable[[int], None] | None = None) -> Image.Image:
    """The decoded, EXIF-oriented image of a file, in its own mode (`to_rgb` converts it, also a
    strip at a time: colorize never holds a second full-size copy); raises Skip.
    `before_decode(pixels)` is called with the header's pixel count once it is within
    `max_pixels`, before any pixel is decoded (colorize waits there for memory)."""
    try:
        f = open_regular(path)  # a FIFO would block open() forever
    except NotRegularFile:
        raise Skip(NOT_A_FILE, "FIFO, socket or device: not read") from None
    except OSError as exc:
        raise Skip("unreadable", exc.strerror or str(exc)) from None
    with f:
        try:
            with warnings.catch_warnings():
                # Our own bound replaces PIL's decompression-bomb warning (an error above 2x).
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = open_bounded(f, max_pixels)
                try:
                    if before_decode is not None:
                        before_decode(im.width * im.height)
                    ImageOps.exif_transpose(im, in_place=True)  # no copy when upright
                    im.load()  # decoded now, while the file is open
                except BaseException:
                    im.close()
                    raise
                return im
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise Skip("unreadable", first_line(exc)) from None


def open_bounded(fp: BinaryIO, max_pixels: int) -> Image.Image:
    """Image.open, refusing more than `max_pixels` (width x height, from the header) with
    Skip("too_large") before any pixel is decoded: a 600 KB palette PNG can claim 13000x13000,
    gigabytes once decoded and converted. PIL's own decompression-bomb error (above 2x its
    MAX_IMAGE_PIXELS) is the same skip."""
    try:
        im = Image.open(fp)
    except Image.DecompressionBombError as exc:
        raise Skip("too_large", first_line(exc)) from None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise Skip("too_large", f"{width}x{height} = {width * height / 1e6:.0f} MP is over "
                                f"--max-pixels {max_pixels / 1e6:g} MP")
    return im


def to_rgb(im: Image.Image) -> np.ndarray:
    """uint8 RGB pixels of a decoded image; 16/32-bit grayscale is scaled, not clipped."""
    if im.mode in _WIDE_GRAY:
        # 0..65535 -> 0..255 with rounding; "I" images from 16-bit files hold the same range.
        wide = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
