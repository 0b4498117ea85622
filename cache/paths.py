"""Output paths: what a path holds, whether it can be written before any work starts, the lock.

``check_writable(path, kind)`` turns the failures that would otherwise come late and as
tracebacks (a path under ``/proc``, a file where a folder is needed, a read-only disk) into one
line up front; phase one checks ``--out`` with it and phase two reuses it for its outputs.
``writer_lock(path)`` keeps two processes from (re)creating or filling the same cache (or run
folder) at once. ``claim_folder(path, command)`` is the rule for output folders: a command writes
only into a new folder, an empty one, or one it made itself (a marker file says so).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    """Hold the writer lock of ``path`` (a cache, a run folder) for the block, or refuse at once
    if another process holds it.

    The lock is an ``flock`` on ``<path>.lock``: the kernel drops it when its process dies, so a
    killed run never leaves a held lock. The holder removes the file when it is done (while it
    still holds the lock, so no one else can be using it), and a process that locked a file
    removed meanwhile tries again on the new one. URLs take no lock.
    """
    if is_url(path):
        yield
        return
    lock_file = lock_path(path)
    os.makedirs(os.path.dirname(lock_file), exist_ok=True)
    fd = _acquire(lock_file)
    if fd is None:
        shared = (" (several processes share one extraction under torchrun)"
                  if what == "extract" else "")
        raise CacheInUse(f"{path} is being written by another process (it holds {lock_file}); "
                         f"wait for it to finish before running {what} on it again{shared}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_file)
        os.close(fd)


def _acquire(lock_file: str) -> int | None:
    """An open descriptor holding the flock of ``lock_file``, or None if another process has
    it."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock_file)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed this file after we opened it: retry


# ------------------------------------------------------------------------------ output folders
MARKER = ".ta2n-made-by"  # in a folder a command created: it may write there again


def claim_folder(path: str | os.PathLike, command: str, what: str = "--out",
                 legacy: Callable[[Path], bool] | None = None) -> bool:
    """Make sure ``command`` may write into the folder ``path``: one that does not exist yet
    (created here), an empty one, or one holding the marker ``command`` left when it made it
    (``legacy(path)``: or that a version before markers recognisably made); the marker is
    written. Anything else - a folder of the user's - is refused in one line: nothing in it is
    ever overwritten. Returns whether the folder was created by this call."""
    folder = Path(path)
    check_writable(folder, "folder", what)
    created = not folder.exists()
    if not created:
        entries = [entry.name for entry in folder.iterdir()]
        marker = folder / MARKER
        made_by = _read_marker(marker) if marker.is_file() else None
        if entries and made_by != command and not (made_by is None and legacy is not None
                                                   and legacy(folder)):
            maker = f"made by `{made_by}`" if made_by else "not made by this tool"
            raise UserError(f"{what} {path} is a folder {maker} that holds "
                            f"{', '.join(sorted(entries)[:3])}{' ...' if len(entries) > 3 else ''}"
                            f"; {command} writes only into a new or empty folder, or one it made: "
                            "choose another")
    folder.mkdir(parents=True, exist_ok=True)
    if _read_marker(folder / MARKER) != command:
        (folder / MARKER).write_text(command + "\n")
    return created


def _read_marker(marker: Path) -> str | None:
    try:
        return marker.read_text().strip()
    except OSError:
        return None


def remove_if_unused(folder: str | os.PathLike) -> None:
    """Remove a folder a command created if the command left nothing in it but its marker (it
    failed before writing anything): a failed run leaves no empty run folder behind."""
    folder = Path(folder)
    try:
        entries = [entry.name for entry in folder.iterdir()]
    except OSError:
        return
    if set(entries) <= {MARKER}:
        with contextlib.suppress(OSError):
            (folder / MARKER).unlink(missing_ok=True)
            folder.rmdir()
