"""The shard format, defined once: file names, sample keys, tar-member grouping, the DALI index
and manifest.json. The writer (pix2pix_dist.shards), the loaders (pix2pix_dist.data), verify,
the benchmark and the tests all import it; it needs the standard library only.

A shard folder holds `{split}-NNNNNN.tar` (samples `<key>.jpg` + `<key>.json`), a DALI index
`{split}-NNNNNN.idx` beside each tar, `manifest.json` (written last: the "complete" marker) and,
while or after writing, `progress.json`. See docs/design.md ("Shard format").

Why not webdataset's own code: its `TarWriter` stamps the current time and its own owner names
into every header and does not report data offsets, and its tar iterators yield decoded sample
dicts, not `TarInfo`s; the DALI index needs the offsets, and resume needs byte-identical tars.
"""

from __future__ import annotations

import itertools
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .files import open_regular, read_text

FORMAT = "pix2pix_dist-shards/1"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
SPLITS = ("train", "val")
INDEX_VERSION = "v1.2"
SHARD_FILE = re.compile(r"^(train|val)-(\d{6})\.(tar|idx)(\.tmp)?$")


def shard_name(split: str, number: int) -> str:
    """`train-000012.tar`: the tar of shard `number` of `split`."""
    return f"{split}-{number:06d}.tar"


def index_name(tar_name: str) -> str:
    """The DALI index beside a tar: `train-000012.idx`."""
    return tar_name[: -len(".tar")] + ".idx"


def is_shard_tar(name: str, split: str) -> bool:
    m = SHARD_FILE.match(name)
    return bool(m) and m.group(1) == split and m.group(3) == "tar" and not m.group(4)


# -- sample keys and grouping --------------------------------------------------------------------


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name. The rule of webdataset and DALI's wds2idx: the key
    ends at the first dot of the last path element."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def group_samples(members: Iterable[tarfile.TarInfo]) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """(key, members) per sample: consecutive regular files sharing a key, in tar order. Other
    members (folders, links, dot files, names without a key) are left out, as wds2idx does."""
    keyed = ((split_name(m.name)[0], m) for m in members if m.isreg())
    usable = ((key, m) for key, m in keyed if key and not key.endswith("/"))
    for key, group in itertools.groupby(usable, key=lambda km: km[0]):
        yield key, [m for _, m in group]


# -- the DALI index (byte for byte what DALI's wds2idx writes) ------------------------------------


def component(ext: str, offset: int, size: int, name: str) -> str:
    """One component of an index line: `<ext> <data offset> <size> <member name>`."""
    return f"{ext} {offset} {size} {name}"


def render_index(samples: list[list[str]]) -> bytes:
    """Index text: a header `v1.2 <samples>`, then one line of `component(...)`s per sample."""
    lines = [f"{INDEX_VERSION} {len(samples)}"] + [" ".join(s) for s in samples]
    return ("\n".join(lines) + "\n").encode("utf-8")


def sample_entry(members: list[tarfile.TarInfo]) -> list[str]:
    """One sample's index line, as `component(...)` strings."""
    return [component(split_name(m.name)[1], m.offset_data, m.size, m.name) for m in members]


def parse_index(text: str) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """render_index's text read back: (key, [(ext, data offset, size) per component]) per
    sample line; raises ValueError or IndexError on a malformed line."""
    samples = []
    for line in text.splitlines()[1:]:
        fields = line.split()  # component()s: <ext> <offset> <size> <name>, ...
        parts = [(fields[i], int(fields[i + 1]), int(fields[i + 2]))
                 for i in range(0, len(fields) - 3, 4)]
        samples.append((split_name(fields[3])[0], parts))
    return samples


def index_sample_count(index: Path) -> int | None:
    """The sample count in an index's header line, None when it is no DALI index."""
    with open_regular(index) as f:
        header = f.readline().split()
    return int(header[1]) if len(header) == 2 and header[1].isdigit() else None


def tar_sample_count(path: Path) -> int:
    """Samples in a tar without an index (raises tarfile.TarError/OSError on a damaged tar)."""
    with open_regular(path) as f, tarfile.open(fileobj=f, mode="r:") as tf:
        return sum(1 for _ in group_samples(tf))


# -- manifest.json -------------------------------------------------------------------------------


class ManifestError(ValueError):
    """manifest.json is missing or not JSON; the message is one line naming the file."""


def load_manifest(root: Path) -> Any:
    """The parsed manifest.json of a shard folder (check it with `manifest_records`)."""
    path = Path(root) / MANIFEST
    try:
        return json.loads(read_text(path))
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing (no finished build here)") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise ManifestError(f"{path}: not readable JSON ({e})") from None


# What a shard record must hold, and of which type, before any of it is used.
_RECORD_FIELDS = {"tar": str, "index": str, "samples": int, "bytes": int, "sha256": str}


def manifest_records(manifest: Any, splits: Iterable[str] = SPLITS
                     ) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """((split, record) of every well-formed shard record of `splits`, problems with the rest).

    The manifest is read from disk, so any part of it may be damaged or hand-edited: each level
    is type-checked here and reported as a problem, never left to raise later. Names must be
    plain shard file names of their split: a record cannot point outside the shard folder.
    """
    if not isinstance(manifest, dict):
        return [], [f"{MANIFEST}: not a JSON object"]
    problems = [] if manifest.get("format") == FORMAT else [
        f"{MANIFEST}: format is {manifest.get('format')!r}, expected {FORMAT!r}"]
    all_splits = manifest.get("splits")
    if not isinstance(all_splits, dict):
        return [], problems + [f"{MANIFEST}: 'splits' is {all_splits!r}, expected an object with "
                               f"{' and '.join(SPLITS)}"]
    records = []
    for s in splits:
        info = all_splits.get(s)
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            problems.append(f"{MANIFEST}: split {s!r} has no list of shards")
            continue
        for i, rec in enumerate(shards):
            bad = [k for k, t in _RECORD_FIELDS.items()
                   if not isinstance(rec, dict) or not isinstance(rec.get(k), t) or isinstance(rec.get(k), bool)]
            if not bad and not (is_shard_tar(rec["tar"], s) and rec["index"] == index_name(rec["tar"])):
                bad = ["tar", "index"]
            if bad:
                problems.append(f"{MANIFEST}: {s} shard {i} has missing or invalid {', '.join(bad)}")
            else:
                records.append((s, rec))
        total = sum(r["samples"] for r in shards if isinstance(r, dict) and type(r.get("samples")) is int)
        if info.get("samples") != total:
            problems.append(f"{MANIFEST}: {s} samples {info.get('samples')} != sum over its shards {total}")
    return records, problems
