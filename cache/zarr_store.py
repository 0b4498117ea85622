"""Zarr v3 backend: a group of chunked arrays, one chunk per video row.

Several processes may write disjoint rows at once: every row of ``features`` and every
element of ``done`` is its own chunk (its own object in the store), so no two writers ever
rewrite the same object. The path may be a local folder or any fsspec URL zarr understands
(``memory://``, ``file://``, ``s3://`` ...).

Integrity: feature chunks end in a CRC32C checksum (zarr's ``crc32c`` codec, part of the v3
spec), checked whenever a chunk is decoded, and their fill value is NaN, so a row whose chunk is
missing reads as NaN rather than as plausible zeros. ``stored_rows`` lists which rows have a chunk.
The row codec before the checksum is chosen per cache (``cache.codecs``).

Row writes (and single-row reads of ``read``, the done flags): a whole row of an array chunked
one row per chunk is encoded in the writing thread
with the array's own codecs and stored with the store's synchronous ``set_sync`` (zarr's
``SupportsSyncCodec`` / ``SupportsSetSync`` protocols) - the same bytes under the same key as
``array[row] = value``, without a round trip through zarr's event loop and its codec thread pool
per call, which cost a writer thread about half its codec's speed (``bench/cache_io.py``). Stores
without the synchronous protocol (fsspec URLs) and other layouts take zarr's own path.

Durability: zarr writes every chunk to a temporary file and renames it into place (no fsync), so
a killed process never leaves a half-written chunk, and the done flag is written after the row.
Nothing is fsynced: after an operating-system crash or power loss a chunk may be lost or empty,
which reads as missing (NaN fill) or fails its checksum - extract redoes missing rows on resume,
and ``--verify`` finds and redoes damaged ones.

This module also owns what a path holds (``inspect``) and the only deletion the tool does:
``remove`` deletes a recognisable cache's own entries and refuses anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import numpy as np
import zarr
from zarr.abc.codec import SupportsSyncCodec
from zarr.abc.store import SupportsDeleteSync, SupportsGetSync, SupportsSetSync
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from cache.codecs import DEFAULT_CODEC, zarr_row_compressors
from cache.errors import DamagedChunk, NotACache, UserError
from cache.paths import Found, is_url

# Row chunks: compressed, then a CRC32C of the compressed bytes appended (cost: bench/cache_io.py)
ROW_CHECKSUM = True
# What decoding a damaged chunk raises: the CRC32C codec a ValueError, blosc a RuntimeError.
DECODE_ERRORS = (ValueError, RuntimeError, OSError)


async def _list_keys(store, prefix: str) -> list[str]:
    return [key async for key in store.list_prefix(prefix)]


async def _list_dir(store, prefix: str) -> list[str]:
    return [key async for key in store.list_dir(prefix)]


def _all_fill(chunk: np.ndarray, fill) -> bool:
    """Whether every value of ``chunk`` is the fill value (NaN counts as equal to NaN)."""
    if fill is None:
        return False
    nan = isinstance(fill, float | np.floating) and np.isnan(fill)

    def is_fill(values: np.ndarray) -> np.ndarray:
        return np.isnan(values) if nan else values == fill

    flat = chunk.reshape(-1)
    # a few sampled values rule out almost every real row before the full pass
    return bool(is_fill(flat[::max(1, flat.size // 64)]).all() and is_fill(flat).all())


def _storage_options(path: str) -> dict | None:
    # fsspec's local filesystem does not create folders unless asked to
    return {"auto_mkdir": True} if path.startswith("file://") else None


def _raw_store(path: str, read_only: bool):
    if is_url(path):
        with _url_packages(path):
            return FsspecStore.from_url(path, storage_options=_storage_options(path),
                                        read_only=read_only)
    return LocalStore(path, read_only=read_only)


@contextlib.contextmanager
def _url_packages(path: str):
    """fsspec imports a URL's file-system package on first use (s3fs for s3://, gcsfs for
    gcs://): a missing one is one line saying which to install."""
    try:
        yield
    except ImportError as e:
        raise UserError(f"{path}: reading this URL needs a package that is not installed ({e})"
                        ) from None


def _first_link(path: str, entries: list[str]) -> str | None:
    """The first symbolic link among ``entries`` of the folder ``path`` and everything under
    them (links are not followed), relative to ``path``; None when there is none."""
    for entry in ["zarr.json", *entries]:
        top = os.path.join(path, entry)
        if os.path.islink(top):
            return entry
        for folder, dirs, files in os.walk(top, followlinks=False):
            for name in dirs + files:
                if os.path.islink(os.path.join(folder, name)):
                    return os.path.relpath(os.path.join(folder, name), path)
    return None


class ZarrBackend:
    name = "zarr"

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        self._arrays: dict[str, Any] = {}
        self._sync_rows: dict[str, bool] = {}

    # ----------------------------------------------------------------- what is at a path
    @classmethod
    def inspect(cls, path: str) -> Found:
        """Nothing, an empty folder, a cache of this tool (with its attributes), or other."""
        if not is_url(path):
            if not os.path.lexists(path):
                return Found("absent")
            if not os.path.isdir(path):
                return Found("other", reason="a file, not a Zarr folder")
        store = _raw_store(path, read_only=True)
        entries = sync(_list_dir(store, ""))
        if not entries:
            return Found("absent" if is_url(path) else "empty")
        raw = sync(store.get("zarr.json", prototype=default_buffer_prototype()))
        if raw is None:
            return Found("other", reason="a folder without zarr.json", entries=entries)
        try:
            meta = json.loads(raw.to_bytes())
        except ValueError as e:
            return Found("other", reason=f"its zarr.json is damaged ({e})", entries=entries)
        if not isinstance(meta, dict) or meta.get("node_type") != "group":
            return Found("other", reason="a Zarr array or other node, not a group", entries=entries)
        attrs = meta.get("attributes") or {}
        if "schema_version" not in attrs:
            return Found("other", reason="a Zarr group without the schema_version attribute",
                         entries=entries)
        return Found("cache", attrs=attrs, entries=entries)

    @classmethod
    def remove(cls, path: str, found: Found, known: tuple[str, ...]) -> None:
        """Delete a recognisable cache's own entries (its zarr.json and arrays), nothing else."""
        strangers = sorted(set(found.entries) - {"zarr.json", *known})
        if strangers:
            raise NotACache(f"{path} holds {', '.join(strangers[:3])}, which no cache holds; it is "
                            "not replaced: move those out, or choose another path")
        if not is_url(path):  # everything is checked before anything is deleted
            link = _first_link(path, found.entries)
            if link is not None:
                raise NotACache(f"{path}: {link} is a symbolic link; a cache of this tool holds "
                                "none, and --overwrite never follows a link out of the cache: "
                                "remove the link yourself, or choose another path")
        store = _raw_store(path, read_only=False)
        for name in found.entries:
            if name != "zarr.json":
                sync(store.delete_dir(name))
        sync(store.delete("zarr.json"))  # last: an interrupted removal stays recognisable

    # ----------------------------------------------------------------- create / open
    @classmethod
    def create(cls, path: str, arrays: dict[str, dict], attrs: dict) -> ZarrBackend:
        """A new group at ``path`` (absent or empty), its attributes written with the group
        itself, so that even a creation killed at once leaves a store recognisable as a cache."""
        try:
            group = zarr.open_group(path, mode="w-", attributes=attrs,
                                    storage_options=_storage_options(path))
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
            raise UserError(
                f"{path} already exists; open it, or pass overwrite to replace it"
            ) from None
        for name, spec in arrays.items():
            rows = "codec" in spec  # a row array: the cache's codec and the checksum
            array = group.create_array(
                name,
                shape=spec["shape"],
                chunks=spec["chunks"],
                dtype=str if spec["dtype"] == "str" else spec["dtype"],
                compressors=zarr_row_compressors(spec["codec"] or DEFAULT_CODEC, ROW_CHECKSUM)
                if rows else "auto",
                fill_value=spec.get("fill_value"),
                # read_done relies on chunks equal to the fill value not being stored
                config={"write_empty_chunks": False},
                chunk_key_encoding={"name": "default", "separator": "/"},
            )
            if spec.get("data") is not None and spec["shape"][0]:
                array[:] = spec["data"]
        return cls(group, path)

    @classmethod
    def open(cls, path: str, writable: bool) -> ZarrBackend:
        try:
            with _url_packages(path):
                group = zarr.open_group(path, mode="r+" if writable else "r",
                                        storage_options=_storage_options(path))
        except (zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError,
                NotADirectoryError) as e:
            raise NotACache(f"{path} is not a feature cache ({e})") from None
        except FileNotFoundError:
            raise UserError(f"no cache at {path}") from None
        except (ValueError, TypeError, KeyError) as e:  # json.JSONDecodeError is a ValueError
            raise UserError(f"{path}: zarr.json is damaged ({e}); restore it, or extract "
                            "again with --overwrite") from None
        return cls(group, path)

    # ----------------------------------------------------------------- arrays
    def _damaged_metadata(self, name: str, error: Exception) -> UserError:
        return UserError(f"{self.path}: {name}/zarr.json is damaged ({error}); restore it, or "
                         "extract again with --overwrite")

    def has(self, name: str) -> bool:
        try:
            return name in self.group
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            raise self._damaged_metadata(name, e) from None

    def array(self, name: str):
        """The array ``name``; a damaged ``<name>/zarr.json`` is a one-line error."""
        if name not in self._arrays:
            try:
                self._arrays[name] = self.group[name]
            except (ValueError, TypeError, KeyError) as e:
                raise self._damaged_metadata(name, e) from None
        return self._arrays[name]

    def checksummed(self, name: str) -> bool:
        """Whether the chunks of ``name`` carry a CRC32C checksum."""
        return any(isinstance(c, Crc32cCodec) for c in self.array(name).compressors)

    def fill_value(self, name: str):
        return self.array(name).fill_value

    def _one_key_per_row(self, array) -> bool:
        """Chunks of one row each, keyed ``c/<row>/0/...``: the layout this tool writes."""
        zeros = (0,) * (array.ndim - 1)
        return (array.metadata.zarr_format == 3 and array.shards is None
                and array.chunks[0] == 1
                and array.metadata.encode_chunk_key((5, *zeros)) == "/".join(
                    ["c", "5", *map(str, zeros)]))

    def read_done(self) -> np.ndarray:
        """All done flags; from one listing of the store when ``done`` has one chunk per row.

        Zarr does not store chunks equal to the fill value (False), so such a row is done
        exactly when its chunk exists: one listing call, which stays fast at 100k rows and on
        object storage, where reading every flag would not. Other layouts (a cache written by
        another program, e.g. one chunk for the whole array) are read by value.
        """
        done = self.array("done")
        if not self._one_key_per_row(done):
            return np.asarray(done[:], dtype=bool)
        keys = sync(_list_keys(self.group.store, f"{done.path}/c/"))
        flags = np.zeros(done.shape, dtype=bool)
        flags[[int(key.rsplit("/", 1)[1]) for key in keys]] = True
        return flags

    def stored_rows(self, name: str) -> np.ndarray | None:
        """Which rows of ``name`` have their chunk in the store (one listing), or None where the
        layout does not allow telling (chunks that split a row, sharding)."""
        array = self.array(name)
        if array.shards is not None or tuple(array.chunks[1:]) != tuple(array.shape[1:]):
            return None
        prefix = f"{array.path}/"
        present = {key[len(prefix):] for key in sync(_list_keys(self.group.store, prefix))}
        per_chunk = array.chunks[0]
        zeros = (0,) * (array.ndim - 1)
        stored = np.zeros(array.shape[0], dtype=bool)
        for chunk in range(array.cdata_shape[0]):
            if array.metadata.encode_chunk_key((chunk, *zeros)) in present:
                stored[chunk * per_chunk:(chunk + 1) * per_chunk] = True
        return stored

    def read_strings(self, name: str) -> list[str]:
        return [str(s) for s in self.array(name)[:]]

    def read(self, name: str, index) -> np.ndarray:
        if isinstance(index, int | np.integer) and self._row_writes(name):
            return self._read_row(name, int(index))
        return np.asarray(self.array(name)[index])

    def _read_row(self, name: str, row: int) -> np.ndarray:
        """Row ``row`` of ``name`` from its one chunk, decoded in this thread with the array's
        codecs in reverse (the fill value where no chunk is stored): one flag read costs a file
        read instead of a round trip through zarr's event loop."""
        array = self.array(name)
        meta = array.metadata
        coords = (row, *(0,) * (array.ndim - 1))
        prototype = default_buffer_prototype()
        raw = array.store.get_sync(f"{array.path}/{meta.encode_chunk_key(coords)}",
                                   prototype=prototype)
        if raw is None:
            return np.full(array.shape[1:], array.fill_value, dtype=meta.dtype.to_native_dtype())
        specs = [meta.get_chunk_spec(coords, array._async_array.config, prototype)]
        for codec in meta.codecs[:-1]:
            specs.append(codec.resolve_metadata(specs[-1]))
        decoded = raw
        for codec, spec in zip(reversed(meta.codecs), reversed(specs)):
            decoded = codec._decode_sync(decoded, spec)
        return decoded.as_numpy_array()[0]

    def read_data(self, name: str, index) -> np.ndarray:
        """Feature data; a chunk that fails to decode raises ``DamagedChunk``."""
        try:
            return np.asarray(self.array(name)[index])
        except DECODE_ERRORS as e:
            raise DamagedChunk("checksum mismatch" if "checksum" in str(e) else
                               f"cannot decode: {e or type(e).__name__}") from None

    def write(self, name: str, index, value) -> None:
        if isinstance(index, int | np.integer) and self._row_writes(name):
            self._write_row(name, int(index), value)
        else:
            self.array(name)[index] = value

    def _row_writes(self, name: str) -> bool:
        """Whether whole rows of ``name`` can be written and read synchronously: one row per
        chunk, no sharding, a store and codecs with the synchronous protocols."""
        if name not in self._sync_rows:
            array = self.array(name)
            self._sync_rows[name] = (
                array.shards is None and array.chunks[0] == 1
                and tuple(array.chunks[1:]) == tuple(array.shape[1:])
                and isinstance(array.store, SupportsGetSync)
                and isinstance(array.store, SupportsSetSync)
                and isinstance(array.store, SupportsDeleteSync)
                and all(isinstance(c, SupportsSyncCodec) for c in array.metadata.codecs))
        return self._sync_rows[name]

    def _write_row(self, name: str, row: int, value) -> None:
        """Encode row ``row`` of ``name`` with the array's codecs, as zarr's codec pipeline does
        (each codec gets the spec its predecessor resolved), and store it under its chunk key;
        a row equal to the fill value is deleted instead (``write_empty_chunks`` False)."""
        array = self.array(name)
        meta = array.metadata
        dtype = meta.dtype.to_native_dtype()
        value = np.asarray(value, dtype=dtype)
        if value.shape != array.shape[1:]:  # a scalar (done flags)
            value = np.broadcast_to(value, array.shape[1:])
        chunk = np.ascontiguousarray(value)[None]  # (1, ...)
        coords = (row, *(0,) * (array.ndim - 1))
        key = f"{array.path}/{meta.encode_chunk_key(coords)}"
        if _all_fill(chunk, array.fill_value):
            array.store.delete_sync(key)
            return
        prototype = default_buffer_prototype()
        spec = meta.get_chunk_spec(coords, array._async_array.config, prototype)
        encoded = prototype.nd_buffer.from_numpy_array(chunk)
        for codec in meta.codecs:
            encoded = codec._encode_sync(encoded, spec)
            spec = codec.resolve_metadata(spec)
        array.store.set_sync(key, encoded)

    # ----------------------------------------------------------------- attributes, size
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def fresh_attrs(self) -> dict[str, Any] | None:
        """The group's attributes as stored now (None: no group there any more), read from its
        zarr.json rather than from the copy zarr keeps in memory."""
        key = f"{self.group.path}/zarr.json" if self.group.path else "zarr.json"
        raw = sync(self.group.store.get(key, prototype=default_buffer_prototype()))
        if raw is None:
            return None
        return json.loads(raw.to_bytes()).get("attributes") or {}

    def update_attrs(self, values: dict) -> None:
        # zarr rewrites the whole attribute document from its in-memory copy: re-read it first so
        # that keys other processes added since this group was opened are kept.
        self.group = zarr.open_group(self.group.store, path=self.group.path, mode="r+")
        self._arrays.clear()
        self.group.attrs.update(values)

    def bytes_stored(self) -> int:
        return sum(self.group[name].nbytes_stored() for name in self.group.array_keys())

    def flush(self) -> None:
        """Zarr writes each chunk as it is set; nothing is buffered."""

    def close(self) -> None:
        self.group.store.close()
