"""DALI's webdataset index (`.idx`), byte-for-byte what DALI's `wds2idx` writes.

Format (v1.2): a header line `v1.2 <samples>`, then one line per sample listing its components
in tar order, each as `<ext> <data offset> <size> <member name>`, space-separated. With an index
DALI's `fn.readers.webdataset` seeks straight to samples instead of parsing every tar at start-up.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

INDEX_VERSION = "v1.2"


def component(ext: str, offset: int, size: int, name: str) -> str:
    return f"{ext} {offset} {size} {name}"


def render_index(samples: list[list[str]]) -> bytes:
    """Index text from per-sample lists of `component(...)` strings."""
    lines = [f"{INDEX_VERSION} {len(samples)}"] + [" ".join(s) for s in samples]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _split_name(name: str) -> tuple[str, str]:
    # Same rule as wds2idx/webdataset: the key ends at the first dot of the last path element.
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def index_from_tar(path: Path) -> bytes:
    """Recompute a tar's index by reading its headers (used by verify)."""
    samples: list[list[str]] = []
    last = None
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isreg():
                continue
            base, ext = _split_name(m.name)
            if not base or base.endswith("/"):
                continue
            entry = component(ext, m.offset_data, m.size, m.name)
            if base != last:
                samples.append([entry])
                last = base
            else:
                samples[-1].append(entry)
    return render_index(samples)
