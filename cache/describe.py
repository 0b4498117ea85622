"""A cache summarised for people: `cache info`'s and `cache verify`'s text."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cache.store import Damage

def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def format_info(info: dict) -> str:
    """The human-readable summary that ``cli.py info`` prints."""
    c, t, h, w = info["shape"]
    attrs = info["attrs"]
    lines = [
        f"cache      {info['path']} ({info['backend']})",
        f"rows       {info['rows']} ({info['done']} done, {info['not_done']} not done)",
        f"features   C={c} T={t} H={h} W={w} {info['dtype']}"
        + (f", {info['aug_views']} augmented views" if info["aug_views"] else ""),
        f"stored     {info['store_dtype']}"
        + (f" (read as {info['dtype']})" if info["store_dtype"] != info["dtype"] else "")
        + f", codec {info['codec']}",
        f"classes    {info['classes']}",
    ]
    for split, s in info["splits"].items():
        lines.append(f"  {split:<6} {s['videos']:>7} videos {s['done']:>7} done "
                     f"{s['classes']:>4} classes")
    ratio = info["compression_ratio"]
    lines.append(f"on disk    {human_bytes(info['bytes_on_disk'])}"
                 + (f" (compression {ratio:.2f}x)" if ratio else ""))
    lines.append(f"integrity  {info['checksums']} checksum per row, verified on every read"
                 if info["checksums"] else
                 "integrity  no checksums (a cache made before they existed): info --verify "
                 "checks that every done row is stored and decodes")
    if info["missing_done"]:
        rows = info["missing_done"]
        lines.append(f"damaged    {len(rows)} done rows have no stored features (rows "
                     f"{rows[:5]}{' ...' if len(rows) > 5 else ''}): rerunning extract redoes "
                     "them")
    for key in ("backbone", "weights", "image_size", "sampling", "dataset", "created"):
        if key in attrs:
            value = attrs[key]
            if isinstance(value, dict):  # e.g. weights: {source, description, sha256 ...}
                value = value.get("description", value)
            lines.append(f"{key:<10} {value}")
    return "\n".join(lines)


def format_verify(checked: int, damaged: list[Damage], checksummed: bool, show: int = 20) -> str:
    """What ``cli.py info --verify`` prints after the summary."""
    how = ("stored, checksums match" if checksummed else
           "stored and decodable; this cache has no checksums to compare")
    lines = [f"verify     {checked - len(damaged)} of {checked} done rows intact ({how})"]
    lines += [f"  row {d.row} {d.video_id}: {d.reason}" for d in damaged[:show]]
    if len(damaged) > show:
        lines.append(f"  ... {len(damaged) - show} more")
    return "\n".join(lines)
