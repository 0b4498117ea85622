"""HDF5 backend (h5py): one file with the same array names as the Zarr backend.

HDF5 takes one writer at a time: the file is locked while open for writing, and a second writer
(or a reader during a write) is refused with a clear message. Attributes are stored as JSON
strings so that lists and dicts survive the round trip exactly.
"""

from __future__ import annotations

import json
import os
from typing import Any

import h5py
import numpy as np

from cache.errors import UserError

HDF5_SUFFIXES = (".h5", ".hdf5")


def _locked_message(path: str) -> str:
    return (
        f"{path} is in use by another process; an HDF5 cache takes one writer at a time "
        "(use the zarr backend to extract in parallel)"
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
        raise UserError(_locked_message(path)) from None
    except OSError as e:
        if "lock" in str(e).lower():
            raise UserError(_locked_message(path)) from None
        raise UserError(f"{path} is not a feature cache ({e})") from None


class HDF5Backend:
    name = "hdf5"

    def __init__(self, file: h5py.File, path: str):
        self.file = file
        self.path = path

    @classmethod
    def create(cls, path: str, arrays: dict[str, dict], attrs: dict, overwrite: bool):
        file = _open_file(path, "w" if overwrite else "w-")
        for name, spec in arrays.items():
            dtype = h5py.string_dtype("utf-8") if spec["dtype"] == "str" else spec["dtype"]
            compressed = spec["dtype"] in ("float16", "float32")
            file.create_dataset(
                name,
                shape=spec["shape"],
                dtype=dtype,
                chunks=tuple(spec["chunks"]) if compressed else None,
                compression="gzip" if compressed else None,
                compression_opts=1 if compressed else None,
                shuffle=compressed,
                fillvalue=spec.get("fill_value"),
            )
        backend = cls(file, path)
        backend.update_attrs(attrs)
        return backend

    @classmethod
    def open(cls, path: str, writable: bool):
        if not os.path.exists(path):
            raise UserError(f"no cache at {path}")
        return cls(_open_file(path, "r+" if writable else "r"), path)

    def has(self, name: str) -> bool:
        return name in self.file

    def array(self, name: str):
        return self.file[name]

    def read_done(self) -> np.ndarray:
        return self.file["done"][:].astype(bool)

    def read_strings(self, name: str) -> list[str]:
        return list(self.file[name].asstr()[:])

    def read(self, name: str, index) -> np.ndarray:
        return np.asarray(self.file[name][index])

    def write(self, name: str, index, value) -> None:
        self.file[name][index] = value

    @property
    def attrs(self) -> dict[str, Any]:
        return {key: json.loads(value) for key, value in self.file.attrs.items()}

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
