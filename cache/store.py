"""FeatureCache: create, open, write rows, mark them done, list and load splits, summarise.

A cache holds one row per video (see README "Cache format"):

    features      (N, C, T, H, W)     float16 (or float32)   one chunk per row
    aug_features  (N, V, C, T, H, W)  optional extra training views
    video_id      (N,)                str    the split-list line, "<class>/<stem>"
    split         (N,)                str    "train" | "val" | "test"
    label         (N,)                int32  index into attrs["classes"]
    done          (N,)                bool   row fully written; rows not done are never read

The size N is fixed at creation, so several writers can fill disjoint rows of one Zarr store.
A row is marked done only after its features are written, and unmarked before it is rewritten,
so a writer killed at any moment never leaves a done row with partial or stale data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cache.errors import UserError
from cache.hdf5_store import HDF5_SUFFIXES, HDF5Backend
from cache.zarr_store import ZarrBackend

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
REQUIRED_ARRAYS = ("features", "video_id", "split", "label", "done")
REQUIRED_ATTRS = ("schema_version", "classes", "frames", "channels", "height", "width")
BACKENDS = {"zarr": ZarrBackend, "hdf5": HDF5Backend}


def _backend_for(path: str, backend: str | None):
    if backend is None:
        is_hdf5 = str(path).endswith(HDF5_SUFFIXES) or (
            os.path.isfile(path) and _is_hdf5_file(path)
        )
        backend = "hdf5" if is_hdf5 else "zarr"
    if backend not in BACKENDS:
        raise UserError(f"unknown cache backend {backend!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[backend]


def _is_hdf5_file(path: str) -> bool:
    import h5py

    return h5py.is_hdf5(path)


def _contiguous_runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Split sorted row indices into (start, stop, offset) runs that one slice can read."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


@dataclass(frozen=True)
class SplitData:
    """One split in memory: features (n, C, T, H, W), labels (n,), the cache rows they came from."""

    features: np.ndarray | torch.Tensor
    labels: np.ndarray
    rows: np.ndarray


class FeatureCache:
    """One feature cache on disk (Zarr group or HDF5 file) behind one API for both phases."""

    def __init__(self, backend, writable: bool):
        self._backend = backend
        self.writable = writable
        self.path = backend.path
        self._index: dict[str, np.ndarray] | None = None
        self.attrs = backend.attrs

    # ----------------------------------------------------------------- create / open / close
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        video_ids: Sequence[str],
        splits: Sequence[str],
        labels: Sequence[int],
        classes: Sequence[str],
        shape: tuple[int, int, int, int],
        dtype: str = "float16",
        aug_views: int = 0,
        attrs: dict | None = None,
        backend: str | None = None,
        overwrite: bool = False,
    ) -> FeatureCache:
        """Create a cache of ``len(video_ids)`` rows of ``shape`` = (C, T, H, W), none done yet.

        Args:
            path: folder or fsspec URL (zarr), or a ``.h5``/``.hdf5`` file (hdf5).
            video_ids, splits, labels: one entry per row; labels index into ``classes``.
            shape: (C, T, H, W) of one video's feature map.
            dtype: "float16" (default) or "float32".
            aug_views: number of extra training views per row (``aug_features``), 0 for none.
            attrs: extra attributes (backbone, weights, sampling ...), stored as JSON.
            backend: "zarr" or "hdf5"; None picks by the path's suffix.
            overwrite: replace whatever is at ``path``.
        """
        path = str(path)
        n = len(video_ids)
        if not (len(splits) == len(labels) == n):
            raise ValueError("video_ids, splits and labels must have one entry per row")
        bad_splits = sorted(set(splits) - set(SPLITS))
        if bad_splits:
            raise ValueError(f"unknown split names {bad_splits}; use {SPLITS}")
        if dtype not in ("float16", "float32"):
            raise UserError(f"cache dtype must be float16 or float32, not {dtype}")
        labels = np.asarray(labels, dtype=np.int32)
        if n and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError("labels must index into classes")
        c, t, h, w = (int(v) for v in shape)
        arrays = {
            "features": dict(shape=(n, c, t, h, w), chunks=(1, c, t, h, w), dtype=dtype,
                             fill_value=0),
            "video_id": dict(shape=(n,), chunks=(max(n, 1),), dtype="str"),
            "split": dict(shape=(n,), chunks=(max(n, 1),), dtype="str"),
            "label": dict(shape=(n,), chunks=(max(n, 1),), dtype="int32", fill_value=-1),
            # One chunk per flag: concurrent writers of disjoint rows never share an object.
            "done": dict(shape=(n,), chunks=(1,), dtype="bool", fill_value=False),
        }
        if aug_views:
            arrays["aug_features"] = dict(shape=(n, aug_views, c, t, h, w),
                                          chunks=(1, aug_views, c, t, h, w), dtype=dtype,
                                          fill_value=0)
        all_attrs = dict(attrs or {})
        all_attrs.update(schema_version=SCHEMA_VERSION, classes=list(classes), channels=c,
                         frames=t, height=h, width=w, dtype=dtype, aug_views=int(aug_views))
        store = _backend_for(path, backend).create(path, arrays, all_attrs, overwrite)
        if n:
            store.write("video_id", slice(None), np.asarray(list(video_ids), dtype=object))
            store.write("split", slice(None), np.asarray(list(splits), dtype=object))
            store.write("label", slice(None), labels)
        store.flush()
        return cls(store, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", backend: str | None = None):
        """Open an existing cache, read-only (``mode="r"``, never modifies it) or ``"r+"``."""
        if mode not in ("r", "r+"):
            raise ValueError("mode must be 'r' or 'r+'")
        path = str(path)
        store = _backend_for(path, backend).open(path, writable=mode == "r+")
        try:
            cls._validate(store)
        except UserError:
            store.close()
            raise
        return cls(store, writable=mode == "r+")

    @staticmethod
    def _validate(store) -> None:
        attrs = store.attrs
        if "schema_version" not in attrs:
            raise UserError(f"{store.path} is not a feature cache (no schema_version attribute)")
        if attrs["schema_version"] != SCHEMA_VERSION:
            raise UserError(
                f"{store.path} has cache schema_version {attrs['schema_version']}; "
                f"this version reads schema_version {SCHEMA_VERSION}"
            )
        for name in REQUIRED_ARRAYS:
            if not store.has(name):
                raise UserError(f"{store.path} is missing the array '{name}'")
        for name in REQUIRED_ATTRS:
            if name not in attrs:
                raise UserError(f"{store.path} is missing the attribute '{name}'")

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- description
    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one row."""
        return tuple(int(v) for v in self._backend.array("features").shape[1:])

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def aug_views(self) -> int:
        return int(self._backend.array("aug_features").shape[1]) if self.has_aug else 0

    @property
    def has_aug(self) -> bool:
        return self._backend.has("aug_features")

    def __len__(self) -> int:
        return int(self._backend.array("features").shape[0])

    def _load_index(self) -> dict[str, np.ndarray]:
        if self._index is None:
            self._index = {
                "video_id": np.asarray(self._backend.read_strings("video_id"), dtype=object),
                "split": np.asarray(self._backend.read_strings("split"), dtype=object),
                "label": self._backend.read("label", slice(None)).astype(np.int64),
            }
        return self._index

    @property
    def video_ids(self) -> np.ndarray:
        return self._load_index()["video_id"]

    @property
    def splits(self) -> np.ndarray:
        return self._load_index()["split"]

    @property
    def labels(self) -> np.ndarray:
        return self._load_index()["label"]

    @property
    def done(self) -> np.ndarray:
        """Done flags of all rows, read fresh (other processes may be writing)."""
        return self._backend.read_done()

    def rows(self, split: str | None = None, done_only: bool = True) -> np.ndarray:
        """Sorted row indices of one split (all splits for None), by default only done rows."""
        if split is not None and split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        keep = np.ones(len(self), dtype=bool)
        if split is not None:
            keep &= self.splits == split
        if done_only:
            keep &= self.done
        return np.flatnonzero(keep)

    # ----------------------------------------------------------------- writing
    def _require_writable(self) -> None:
        if not self.writable:
            raise UserError(f"{self.path} is open read-only")

    def write_row(self, row: int, features: np.ndarray, aug: np.ndarray | None = None) -> None:
        """Write one video's (C, T, H, W) map (and its (V, C, T, H, W) views), then mark it done."""
        self._require_writable()
        features = np.asarray(features)
        if features.shape != self.shape:
            raise ValueError(f"row {row}: features of shape {features.shape}, "
                             f"the cache holds {self.shape}")
        if self._backend.read("done", row):
            self._backend.write("done", row, False)  # never leave a done flag over stale data
        dtype = self.attrs["dtype"]
        self._backend.write("features", row, features.astype(dtype, copy=False))
        if aug is not None:
            if not self.has_aug:
                raise ValueError("this cache was created without aug_features")
            self._backend.write("aug_features", row, np.asarray(aug).astype(dtype, copy=False))
        self._backend.flush()
        self._backend.write("done", row, True)
        self._backend.flush()

    def update_attrs(self, **values) -> None:
        """Add or replace attributes (JSON-compatible values)."""
        self._require_writable()
        self._backend.update_attrs(values)
        self.attrs = self._backend.attrs

    # ----------------------------------------------------------------- reading
    def _check_done(self, rows: np.ndarray) -> None:
        done = self.done[rows] if len(rows) > 1 else self._backend.read("done", rows).astype(bool)
        if not done.all():
            missing = np.asarray(rows)[~done][:5].tolist()
            raise UserError(f"{self.path}: rows {missing} are not done (extraction unfinished)")

    def read_row(self, row: int, view: int | None = None) -> np.ndarray:
        """One done row's (C, T, H, W) map: the cached view, or augmented view ``view``."""
        self._check_done(np.asarray([row]))
        if view is None:
            return self._backend.read("features", row)
        return self._backend.read("aug_features", (row, view))

    def read_rows(self, rows: Sequence[int], array: str = "features", dtype: str | None = None,
                  views: Sequence[int] | None = None, check_done: bool = True) -> np.ndarray:
        """Done rows, in the order given, stacked as (n, ...) — read as few slices as possible.

        ``views`` picks one augmented view per row (from ``aug_features``). ``check_done=False``
        skips re-reading the done flags, for rows that came from ``rows(split)`` already.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if check_done:
            self._check_done(rows)
        if views is not None:
            return np.stack([self._backend.read("aug_features", (int(r), int(v)))
                             for r, v in zip(rows, views)]).astype(dtype or self.attrs["dtype"])
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        source = self._backend.array(array)
        out = np.empty((len(rows), *source.shape[1:]), dtype=dtype or source.dtype)
        for start, stop, offset in _contiguous_runs(sorted_rows):
            out[order[offset:offset + stop - start]] = self._backend.read(array, slice(start, stop))
        return out

    def load_split(
        self,
        split: str,
        *,
        array: str = "features",
        dtype: str | None = None,
        as_torch: bool = False,
        device: torch.device | str | None = None,
    ) -> SplitData:
        """Load every done row of ``split`` into memory (numpy, or a torch tensor on ``device``).

        Rows are read as contiguous slices (one per run of consecutive rows), which is as fast
        as the backend reads; ``dtype`` converts while copying (default: the stored dtype).
        """
        rows = self.rows(split)
        features = self.read_rows(rows, array=array, dtype=dtype)
        labels = self.labels[rows]
        if as_torch or device is not None:
            features = torch.from_numpy(features)
            if device is not None:
                features = features.to(device)
        return SplitData(features=features, labels=labels, rows=rows)

    # ----------------------------------------------------------------- summary
    def info(self) -> dict:
        """Counts per split, classes, done / not done, bytes on disk, compression ratio."""
        done = self.done
        per_split = {}
        for split in SPLITS:
            in_split = self.splits == split
            per_split[split] = {
                "videos": int(in_split.sum()),
                "done": int((in_split & done).sum()),
                "classes": int(len(np.unique(self.labels[in_split]))),
            }
        c, t, h, w = self.shape
        itemsize = np.dtype(self.attrs["dtype"]).itemsize
        raw = int(done.sum()) * c * t * h * w * itemsize * (1 + self.aug_views)
        stored = self._backend.bytes_stored()
        return {
            "path": self.path,
            "backend": self.backend,
            "rows": len(self),
            "done": int(done.sum()),
            "not_done": int((~done).sum()),
            "splits": per_split,
            "classes": len(self.classes),
            "shape": [c, t, h, w],
            "dtype": self.attrs["dtype"],
            "aug_views": self.aug_views,
            "bytes_on_disk": stored,
            "raw_bytes_done": raw,
            "compression_ratio": (raw / stored) if stored else None,
            "attrs": self.attrs,
        }


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
        f"classes    {info['classes']}",
    ]
    for split, s in info["splits"].items():
        lines.append(f"  {split:<6} {s['videos']:>7} videos {s['done']:>7} done "
                     f"{s['classes']:>4} classes")
    ratio = info["compression_ratio"]
    lines.append(f"on disk    {human_bytes(info['bytes_on_disk'])}"
                 + (f" (compression {ratio:.2f}x)" if ratio else ""))
    for key in ("backbone", "weights", "image_size", "sampling", "dataset", "created"):
        if key in attrs:
            value = attrs[key]
            if isinstance(value, dict):  # e.g. weights: {source, description, sha256 ...}
                value = value.get("description", value)
            lines.append(f"{key:<10} {value}")
    return "\n".join(lines)
