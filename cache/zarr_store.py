"""Zarr v3 backend: a group of chunked arrays, one chunk per video row.

Several processes may write disjoint rows at once: every row of ``features`` and every
element of ``done`` is its own chunk (its own object in the store), so no two writers ever
rewrite the same object. The path may be a local folder or any fsspec URL zarr understands
(``memory://``, ``file://``, ``s3://`` ...).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from cache.errors import UserError

COMPRESSOR = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")  # bench/cache_io.py


async def _list_keys(store, prefix: str) -> list[str]:
    return [key async for key in store.list_prefix(prefix)]


def _storage_options(path: str) -> dict | None:
    # fsspec's local filesystem does not create folders unless asked to
    return {"auto_mkdir": True} if path.startswith("file://") else None


class ZarrBackend:
    name = "zarr"

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path

    @classmethod
    def create(cls, path: str, arrays: dict[str, dict], attrs: dict, overwrite: bool):
        try:
            group = zarr.open_group(path, mode="w" if overwrite else "w-",
                                    storage_options=_storage_options(path))
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
            raise UserError(
                f"{path} already exists; open it, or pass overwrite to replace it"
            ) from None
        for name, spec in arrays.items():
            compressed = spec["dtype"] in ("float16", "float32")
            group.create_array(
                name,
                shape=spec["shape"],
                chunks=spec["chunks"],
                dtype=str if spec["dtype"] == "str" else spec["dtype"],
                compressors=COMPRESSOR if compressed else "auto",
                fill_value=spec.get("fill_value"),
                # read_done relies on chunks equal to the fill value not being stored
                config={"write_empty_chunks": False},
                chunk_key_encoding={"name": "default", "separator": "/"},
            )
        group.attrs.update(attrs)
        return cls(group, path)

    @classmethod
    def open(cls, path: str, writable: bool):
        try:
            group = zarr.open_group(path, mode="r+" if writable else "r")
        except (zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError) as e:
            raise UserError(f"{path} is not a feature cache ({e})") from None
        except FileNotFoundError:
            raise UserError(f"no cache at {path}") from None
        return cls(group, path)

    def has(self, name: str) -> bool:
        return name in self.group

    def array(self, name: str):
        return self.group[name]

    def read_done(self) -> np.ndarray:
        """All done flags from one listing of the store instead of one read per flag.

        ``done`` has one chunk per row and zarr does not store chunks equal to the fill value
        (False), so a row is done exactly when its chunk exists: one listing call, which stays
        fast at 100k rows and on object storage, where reading every flag would not.
        """
        keys = sync(_list_keys(self.group.store, f"{self.group['done'].path}/c/"))
        done = np.zeros(self.group["done"].shape, dtype=bool)
        rows = [int(key.rsplit("/", 1)[1]) for key in keys]
        done[rows] = True
        return done

    def read_strings(self, name: str) -> list[str]:
        return [str(s) for s in self.group[name][:]]

    def read(self, name: str, index) -> np.ndarray:
        return np.asarray(self.group[name][index])

    def write(self, name: str, index, value) -> None:
        self.group[name][index] = value

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def update_attrs(self, values: dict) -> None:
        # zarr rewrites the whole attribute document from its in-memory copy: re-read it first so
        # that keys other processes added since this group was opened are kept.
        self.group = zarr.open_group(self.group.store, path=self.group.path, mode="r+")
        self.group.attrs.update(values)

    def bytes_stored(self) -> int:
        return sum(self.group[name].nbytes_stored() for name in self.group.array_keys())

    def flush(self) -> None:
        """Zarr writes each chunk as it is set; nothing is buffered."""

    def close(self) -> None:
        self.group.store.close()
