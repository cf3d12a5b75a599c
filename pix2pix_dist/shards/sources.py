"""Where images come from: a folder tree, a zip (e.g. COCO's train2017.zip), or skimage's photos.

A source is listed once, up front, into sorted `Candidate`s (path + size, no pixels read), so
the order, the random subset and the shuffle depend only on the file list and the seed.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import ShardError
from ..files import open_regular
from ..imageio import IMAGE_EXTENSIONS, find_image_files, has_image_ext, is_hidden

SAMPLE = "sample"
NOT_REGULAR = -2  # Candidate.size of a FIFO, socket or device: skipped as `not_a_file`, never opened
MAX_KEY_LEN = 80  # "<key>.json" must fit a plain ustar name (100 bytes): no PAX/GNU headers


@dataclass(frozen=True)
class Candidate:
    relpath: str
    """Path relative to the source root (zip: the member name), '/'-separated."""
    size: int
    """File size in bytes as listed, -1 when unknown, NOT_REGULAR for a FIFO, socket or device
    (part of the source fingerprint used to resume)."""


@dataclass
class Source:
    kind: str
    """'folder', 'zip' or 'sample' (a folder: skimage's data directory)."""
    path: Path
    name: str
    """Dataset name used for the default output folder: 'sample', or the folder/zip stem."""
    candidates: list[Candidate] = field(default_factory=list)
    unreadable_folders: list[str] = field(default_factory=list)
    """Subfolders that could not be listed ('a/b/'): counted as `unreadable` skips, not dropped."""

    def fingerprint(self) -> str:
        """Hash of the file list (names and sizes): a resumed run must see the same files."""
        h = hashlib.sha256()
        for c in self.candidates:
            h.update(f"{c.relpath}\t{c.size}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def sample_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def _walk(root: Path) -> tuple[list[Candidate], list[str]]:
    """(candidates, subfolders that could not be listed), by imageio's one search rule."""
    try:
        files, unreadable = find_image_files(root)
    except OSError:
        raise ShardError(f"cannot list source folder {root}") from None
    return [Candidate(relpath, _listed_size(path)) for relpath, path in files], unreadable


def _listed_size(path: Path) -> int:
    try:
        info = os.stat(path)
    except OSError:
        # A dangling symlink or a file we may not stat: listed anyway (size unknown), so reading
        # it fails and it is counted as `unreadable` instead of vanishing silently.
        return -1
    # A FIFO or device named *.jpg is listed but never opened: reading could block.
    return info.st_size if stat.S_ISREG(info.st_mode) else NOT_REGULAR


def _list_zip(path: Path) -> list[Candidate]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ShardError(f"damaged zip {path}: {e} (download it again)") from None
    by_name: dict[str, Candidate] = {}
    for info in infos:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if info.is_dir() or not has_image_ext(name) or any(is_hidden(p) for p in parts):
            continue
        by_name[name] = Candidate(name, info.file_size)  # a repeated name: the last one wins, like zf.read
    return sorted(by_name.values(), key=lambda c: c.relpath)


def open_source(spec: str | os.PathLike) -> Source:
    """Resolve `spec` ('sample', a folder or a .zip) and list its image files."""
    if str(spec) == SAMPLE:
        root = sample_dir().resolve()  # resolved like a folder source, so --val-source compares equal
        src = Source("sample", root, SAMPLE, *_walk(root))
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ShardError(f"source not found: {spec}")
        path = path.resolve()
        if path.is_dir():
            src = Source("folder", path, path.name or "images", *_walk(path))
        elif path.is_file() and (zipfile.is_zipfile(path) or _looks_like_zip(path)):
            # A damaged zip (cut short: no central directory) is named as such by _list_zip.
            src = Source("zip", path, path.stem, _list_zip(path))
        else:
            raise ShardError(f"source must be an image folder, a .zip of images or 'sample': {spec}")
    if not src.candidates:
        exts = ", ".join(IMAGE_EXTENSIONS)
        raise ShardError(f"no images in {spec} (looked for {exts}, in subfolders too)")
    return src


def _looks_like_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return path.suffix.lower() == ".zip" or f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def _base_key(relpath: str, strip: int) -> str:
    parts = relpath.replace("\\", "/").split("/")[strip:]
    stem = str(PurePosixPath(*parts).with_suffix("")) if parts else relpath
    # webdataset splits a name at its first '.', DALI's index is space-separated, '/' would make
    # folders inside the tar: keep [A-Za-z0-9_-] only.
    key = _BAD_KEY_CHARS.sub("_", stem).strip("_") or "img"
    if len(key) > MAX_KEY_LEN:
        key = key[: MAX_KEY_LEN - 9] + "-" + hashlib.sha1(relpath.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return key


def _common_dir_depth(relpaths: list[str]) -> int:
    """Number of leading folders shared by every path (COCO zips wrap all in 'train2017/')."""
    return len(os.path.commonprefix([p.replace("\\", "/").split("/")[:-1] for p in relpaths]))


def assign_keys(sources: list[Source]) -> list[list[str]]:
    """Sample keys for every candidate of every source, unique over all of them.

    A key is the path below the shared top folder, without extension, sanitized: the COCO file
    `train2017/000000000139.jpg` gives `000000000139`, `cats/tabby 1.png` gives `cats_tabby_1`.
    Keys that collide (`a.jpg` and `a.png`, or the same name in train and val sources) all get a
    suffix hashed from their source and path, so a key never depends on processing order.
    """
    keys: list[list[str]] = []
    for src in sources:
        depth = _common_dir_depth([c.relpath for c in src.candidates])
        keys.append([_base_key(c.relpath, depth) for c in src.candidates])
    counts = Counter(k for ks in keys for k in ks)
    seen: set[str] = set()
    for si, (src, ks) in enumerate(zip(sources, keys)):
        for i, k in enumerate(ks):
            if counts[k] > 1:
                tag = f"{si}:{src.candidates[i].relpath}".encode("utf-8", "surrogateescape")
                k = f"{k[: MAX_KEY_LEN - 9]}-{hashlib.sha1(tag).hexdigest()[:8]}"
            n, base = 1, k
            while k in seen:  # a hash collision on top of a name collision: practically never
                k, n = f"{base}-{n}", n + 1
            seen.add(k)
            ks[i] = k
    return keys


class Reader:
    """Reads a candidate's bytes. One per process: a zip is opened once, not per image."""

    def __init__(self, kind: str, path: Path):
        self.kind, self.path = kind, Path(path)
        self._zip: zipfile.ZipFile | None = None

    def read(self, relpath: str, limit: int) -> bytes:
        """The file's bytes, at most limit + 1 of them (more than `limit` means too large).
        Raises NotRegularFile for a file that became a FIFO/device since it was listed."""
        if self.kind == "zip":
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.path)
            with self._zip.open(relpath) as f:
                return f.read(limit + 1)
        with open_regular(self.path / relpath) as f:
            return f.read(limit + 1)
