"""HDF5 backend (h5py): one file with the same array names as the Zarr backend.

HDF5 takes one writer at a time: the file is locked while open for writing, and a second writer
(or a reader during a write) is refused with a clear message. Attributes are stored as JSON
strings so that lists and dicts survive the round trip exactly; attributes another program wrote
as plain HDF5 values are read as they are.

Integrity: feature chunks carry HDF5's Fletcher-32 checksum, checked on every read, and their
fill value is NaN, so a row whose chunk was never written reads as NaN. A cache is created under
a temporary name and renamed into place when complete, and an existing file is checked (lock,
recognisable cache) before anything touches it: h5py's own "w" mode truncates the file first.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import h5py
import numpy as np

from cache.errors import CacheInUse, DamagedChunk, NotACache, UserError
from cache.paths import Found

HDF5_SUFFIXES = (".h5", ".hdf5")
ROW_CHECKSUM = True  # Fletcher-32 on the row chunks (cost: bench/cache_io.py)
# HDF5's lock failures name the lock and errno 11 (EAGAIN/EWOULDBLOCK); nothing else matches,
# in particular not "sblock" in the message of a truncated file.
_LOCK_FAILURE = re.compile(r"unable to lock file|errno = 11\b")


def _locked_message(path: str) -> str:
    return (
        f"{path} is in use by another process; an HDF5 cache takes one writer at a time "
        "(wait for it to finish, or use the zarr backend to extract in parallel)"
    )


def _open_file(path: str, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise UserError(f"no cache at {path}") from None
    except FileExistsError:
        raise UserError(f"{path} already exists; open it, or pass overwrite to replace it") \
            from None
    except BlockingIOError:
        raise CacheInUse(_locked_message(path)) from None
    except OSError as e:
        if _LOCK_FAILURE.search(str(e)):
            raise CacheInUse(_locked_message(path)) from None
        if "truncated file" in str(e):
            raise UserError(f"{path} is a damaged HDF5 file ({e}): it is shorter than its "
                            "header says (an interrupted copy?)") from None
        raise NotACache(f"{path} is not a feature cache ({e})") from None


def _attr_value(value) -> Any:
    """A stored attribute: ours are JSON strings; plain HDF5 values from other programs are
    converted to Python values, and strings that are not JSON kept as they are."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, list):  # e.g. a list of class names stored as HDF5 byte strings
        return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v
                for v in value]
    return value


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _temporary_name(path: str) -> str:
    """Where a new cache is built before it is renamed to ``path`` (removed by the next
    creation if a kill left it)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.ta2n-creating")


class HDF5Backend:
    name = "hdf5"

    def __init__(self, file: h5py.File, path: str):
        self.file = file
        self.path = path
        self._inode = _inode(path)

    # ----------------------------------------------------------------- what is at a path
    @classmethod
    def inspect(cls, path: str) -> Found:
        """Nothing, an empty file, a cache of this tool, or other; refuses (CacheInUse) when
        another process writes the file - the lock is checked before anything else."""
        if not os.path.lexists(path):
            return Found("absent")
        if os.path.isdir(path):
            return Found("other", reason="a folder, not an HDF5 file")
        if os.path.getsize(path) == 0:
            return Found("empty")
        try:
            file = h5py.File(path, "r")
        except OSError as e:  # BlockingIOError included
            if isinstance(e, BlockingIOError) or _LOCK_FAILURE.search(str(e)):
                raise CacheInUse(_locked_message(path)) from None
            return Found("other", reason=f"not a readable HDF5 file: {e}")
        with file:
            try:
                attrs = {key: _attr_value(value) for key, value in file.attrs.items()}
            except OSError as e:
                return Found("other", reason=f"unreadable attributes ({e})")
        if "schema_version" not in attrs:
            return Found("other", reason="an HDF5 file without the schema_version attribute")
        return Found("cache", attrs=attrs)

    @classmethod
    def remove(cls, path: str, found: Found, known: tuple[str, ...]) -> None:
        """Nothing to do: ``create`` renames the new file over the old one."""

    # ----------------------------------------------------------------- create / open
    @classmethod
    def create(cls, path: str, arrays: dict[str, dict], attrs: dict) -> HDF5Backend:
        """Build the cache under a temporary name, then rename it to ``path`` in one step, so a
        kill leaves either no cache or a complete empty one, and never half of a file."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        temporary = _temporary_name(path)
        with _open_file(temporary, "w") as file:
            for key, value in attrs.items():
                file.attrs[key] = json.dumps(value)
            for name, spec in arrays.items():
                cls._create_dataset(file, name, spec)
        os.replace(temporary, path)
        return cls(_open_file(path, "r+"), path)

    @staticmethod
    def _create_dataset(file: h5py.File, name: str, spec: dict) -> None:
        dtype = h5py.string_dtype("utf-8") if spec["dtype"] == "str" else spec["dtype"]
        rows = "codec" in spec  # a row array: chunked by row, gzip-1 + shuffle, checksummed
        dataset = file.create_dataset(
            name,
            shape=spec["shape"],
            dtype=dtype,
            chunks=tuple(spec["chunks"]) if rows else None,
            compression="gzip" if rows else None,
            compression_opts=1 if rows else None,
            shuffle=rows,
            fletcher32=rows and ROW_CHECKSUM,
            fillvalue=spec.get("fill_value"),
        )
        if spec.get("data") is not None and spec["shape"][0]:
            dataset[:] = spec["data"]

    @classmethod
    def open(cls, path: str, writable: bool) -> HDF5Backend:
        if not os.path.exists(path):
            raise UserError(f"no cache at {path}")
        return cls(_open_file(path, "r+" if writable else "r"), path)

    # ----------------------------------------------------------------- arrays
    def has(self, name: str) -> bool:
        return name in self.file

    def array(self, name: str):
        return self.file[name]

    def checksummed(self, name: str) -> bool:
        return bool(self.file[name].fletcher32)

    def fill_value(self, name: str):
        return self.file[name].fillvalue

    def read_done(self) -> np.ndarray:
        return self.file["done"][:].astype(bool)

    def stored_rows(self, name: str) -> np.ndarray | None:
        """Which rows of ``name`` have an allocated chunk, or None for layouts where that does
        not tell (contiguous storage, chunks that split a row)."""
        dataset = self.file[name]
        if dataset.chunks is None or tuple(dataset.chunks[1:]) != tuple(dataset.shape[1:]):
            return None
        stored = np.zeros(dataset.shape[0], dtype=bool)
        per_chunk = dataset.chunks[0]

        def visit(info) -> None:
            start = info.chunk_offset[0]
            stored[start:start + per_chunk] = True

        dataset.id.chunk_iter(visit)
        return stored

    def read_strings(self, name: str) -> list[str]:
        return list(self.file[name].asstr()[:])

    def read(self, name: str, index) -> np.ndarray:
        return np.asarray(self.file[name][index])

    def read_data(self, name: str, index) -> np.ndarray:
        """Feature data; a chunk failing its checksum (or unreadable) raises ``DamagedChunk``."""
        try:
            return np.asarray(self.file[name][index])
        except OSError as e:  # HDF5 says only that a filter (Fletcher-32, gzip) failed
            raise DamagedChunk(f"checksum mismatch or cannot decode: {e}") from None

    def write(self, name: str, index, value) -> None:
        self.file[name][index] = value

    # ----------------------------------------------------------------- attributes, size
    @property
    def attrs(self) -> dict[str, Any]:
        return {key: _attr_value(value) for key, value in self.file.attrs.items()}

    def fresh_attrs(self) -> dict[str, Any] | None:
        """The attributes of the file now at the path (None: gone). A file created again is
        renamed into place, so this handle keeps reading the old one: the inode tells."""
        if _inode(self.path) != self._inode:
            found = self.inspect(self.path)
            return found.attrs if found.state == "cache" else None
        return self.attrs

    def update_attrs(self, values: dict) -> None:
        for key, value in values.items():
            self.file.attrs[key] = json.dumps(value)

    def bytes_stored(self) -> int:
        return os.path.getsize(self.path)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()
