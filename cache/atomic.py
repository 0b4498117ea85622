"""Atomic file writes, the one implementation every module uses: write a temporary file in the
destination's folder, then ``os.replace`` it over the destination. A reader never sees half a
file, and a process killed mid-write leaves the previous version (or nothing) behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success it replaces ``path``, on any error
    (Ctrl-C included) it is removed. ``suffix`` keeps an extension a writer needs (``.mp4``).
    Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, payload, indent: int | None = 1) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (``indent=None``: compact)."""
    write_text(path, json.dumps(payload, indent=indent) + "\n")
