"""The few lines printed at the end of a run."""

from __future__ import annotations

from typing import Any

from ..shard_format import SPLITS


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def format_summary(manifest: dict[str, Any], seconds: float | None = None, examples: int = 3) -> str:
    out = manifest["args"]["output"]
    lines = []
    for s in SPLITS:
        info = manifest["splits"][s]
        n = len(info["shards"])
        lines.append(f"  {s:<5} {info['samples']:>9,} samples in {n:>4} shard{'s' if n != 1 else ''}"
                     f"  ({_mb(info['bytes'])})")
    skipped = manifest.get("skipped", {})
    total_skipped = sum(skipped.values())
    if total_skipped:
        lines.append(f"  skipped {total_skipped:,}:")
        for reason, count in sorted(skipped.items(), key=lambda kv: -kv[1]):
            ex = manifest.get("skipped_examples", {}).get(reason, [])[:examples]
            more = ", ..." if count > len(ex) else ""
            lines.append(f"    {reason:<13} {count:>7,}  ({', '.join(ex)}{more})")
    total = sum(manifest["splits"][s]["samples"] for s in SPLITS)
    limit = manifest["args"].get("limit")
    if limit and total < limit:  # the subset is smaller than asked for: say so, not just the count
        lines.append(f"  note: --limit {limit} asked, only {total} usable images")
    head = f"wrote {total:,} samples to {out}"
    if seconds is not None:
        head += f" in {seconds:.1f} s"
    return "\n".join([head] + lines)
