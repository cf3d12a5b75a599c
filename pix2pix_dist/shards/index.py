"""DALI's webdataset index (`.idx`), byte-for-byte what DALI's `wds2idx` writes.

Format (v1.2): a header line `v1.2 <samples>`, then one line per sample listing its components
in tar order, each as `<ext> <data offset> <size> <member name>`, space-separated. With an index
DALI's `fn.readers.webdataset` seeks straight to samples instead of parsing every tar at start-up.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

INDEX_VERSION = "v1.2"


def component(ext: str, offset: int, size: int, name: str) -> str:
    return f"{ext} {offset} {size} {name}"


def render_index(samples: list[list[str]]) -> bytes:
    """Index text from per-sample lists of `component(...)` strings."""
    lines = [f"{INDEX_VERSION} {len(samples)}"] + [" ".join(s) for s in samples]
    return ("\n".join(lines) + "\n").encode("utf-8")


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name. Same rule as wds2idx/webdataset: the key ends at the
    first dot of the last path element."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def group_samples(members: Iterable[tarfile.TarInfo]) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """(key, members) per sample: consecutive regular files sharing a key, in tar order. Other
    members (folders, links, names without a key) are left out, as wds2idx leaves them out."""
    key, group = None, []
    for m in members:
        base, _ = split_name(m.name)
        if not m.isreg() or not base or base.endswith("/"):
            continue
        if base != key and group:
            yield key, group  # type: ignore[misc]
            group = []
        key = base
        group.append(m)
    if group:
        yield key, group  # type: ignore[misc]


def sample_entry(members: list[tarfile.TarInfo]) -> list[str]:
    """One sample's index line, as `component(...)` strings."""
    return [component(split_name(m.name)[1], m.offset_data, m.size, m.name) for m in members]


def index_from_tar(path: Path) -> bytes:
    """Recompute a tar's index by reading its headers only (what `wds2idx` does)."""
    with tarfile.open(path, "r:") as tf:
        return render_index([sample_entry(ms) for _, ms in group_samples(tf)])
