"""Output paths: what a path holds, whether it can be written before any work starts, the lock.

``check_writable(path, kind)`` turns the failures that would otherwise come late and as
tracebacks (a path under ``/proc``, a file where a folder is needed, a read-only disk) into one
line up front; phase one checks ``--out`` with it and phase two reuses it for its outputs.
``writer_lock(path)`` keeps two processes from (re)creating or filling the same cache at once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import filelock

from cache.errors import CacheInUse, UserError

KINDS = ("file", "folder")


@dataclass(frozen=True)
class Found:
    """What a cache path holds: "absent", "empty" (an empty folder or file), "cache" (a cache of
    this tool, recognised by its schema_version attribute) or "other" (never replaced)."""

    state: str
    attrs: dict = field(default_factory=dict)
    reason: str = ""
    entries: list = field(default_factory=list)  # a Zarr folder's top-level names


def is_url(path: str | os.PathLike) -> bool:
    """An fsspec URL (``s3://``, ``memory://``, ``file://`` ...) rather than a local path."""
    return "://" in str(path)


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (``/`` always does)."""
    while not (path.exists() or path.is_symlink()):
        path = path.parent
    return path


def _probe(folder: Path, path: str, what: str) -> None:
    """Create and remove a temporary file in ``folder``: the only test that works for root,
    read-only mounts and pseudo file systems alike (``os.access`` says yes to root)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".ta2n-write-test-")
    except OSError as e:
        raise UserError(f"cannot write {what} {path}: {folder} is not writable "
                        f"({e.strerror or e})") from None
    os.close(fd)
    os.remove(name)


def check_writable(path: str | os.PathLike, kind: str = "file", what: str = "output") -> None:
    """Raise a one-line ``UserError`` unless ``path`` can be written as a ``kind`` ("file" or
    "folder"), creating missing parent folders. Checks without leaving anything behind.

    URLs are not checked: their store reports its own errors when written.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if is_url(path):
        return
    target = Path(os.path.abspath(path))
    if target.is_symlink() and not target.exists():
        raise UserError(f"cannot write {what} {path}: it is a dangling or looping symbolic link")
    if target.exists():
        if kind == "folder" and not target.is_dir():
            raise UserError(f"cannot write {what} {path}: it is a file, not a folder")
        if kind == "file" and target.is_dir():
            raise UserError(f"cannot write {what} {path}: it is a folder, not a file")
        _probe(target if kind == "folder" else target.parent, str(path), what)
        return
    ancestor = _nearest_existing(target.parent)
    if not ancestor.is_dir():
        raise UserError(f"cannot write {what} {path}: {ancestor} is a file, not a folder")
    _probe(ancestor, str(path), what)


def lock_path(path: str | os.PathLike) -> str:
    """The lock file of a cache: ``<path>.lock`` next to it (it outlives the cache's deletion
    and recreation, which a file inside the cache folder would not)."""
    return os.path.abspath(str(path)).rstrip(os.sep) + ".lock"


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike, what: str = "extract"):
    """Hold the cache's writer lock for the block, or refuse at once if another process holds it.

    The lock is an ``flock`` on ``<path>.lock`` (an empty file left in place): the kernel drops it
    when its process dies, so a killed run never leaves a stale lock. URLs take no lock.
    """
    if is_url(path):
        yield
        return
    lock_file = lock_path(path)
    os.makedirs(os.path.dirname(lock_file), exist_ok=True)
    lock = filelock.FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise CacheInUse(f"{path} is being written by another process (it holds {lock_file}); "
                         f"wait for it to finish before running {what} on it again "
                         "(several processes share one extraction under torchrun)") from None
    try:
        yield
    finally:
        lock.release()
