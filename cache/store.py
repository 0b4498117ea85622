"""FeatureCache: create, open, write rows, mark them done, list, load and verify splits, summarise.

A cache holds one row per video (see docs/cache.md):

    features      (N, C, T, H, W)     float16 (or float32)   one chunk per row, checksummed
    aug_features  (N, V, C, T, H, W)  optional extra training views
    video_id      (N,)                str    the split-list line, "<class>/<stem>"
    split         (N,)                str    "train" | "val" | "test"
    label         (N,)                int32  index into attrs["classes"]
    done          (N,)                bool   row fully written; rows not done are never read

The size N is fixed at creation, so several writers can fill disjoint rows of one Zarr store.
A row is marked done only after its features are written, and unmarked before it is rewritten,
so a writer killed at any moment never leaves a done row with partial or stale data.

Done rows are verified as they are read: every feature chunk carries a checksum (CRC32C in Zarr,
Fletcher-32 in HDF5) that the backend checks on decoding, and the fill value is NaN, so a row
whose chunk is missing (deleted, or a forged done flag) is found instead of read as zeros. Either
raises a one-line ``UserError`` naming the row. ``verify`` checks every done row; extract redoes
the rows it finds damaged. Opening checks the metadata (shapes, dtype, labels against classes,
duplicate videos), so a damaged cache fails at open in one line, not after hours of training.

The layout (arrays, attributes, backends, creation and open-time checks) is cache/layout.py,
the row ranges of reads cache/rows.py, the text of `cache info` / `cache verify`
cache/describe.py; their public names stay importable from here.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cache import store_dtype as row_formats
from cache.codecs import check_codec
from cache.describe import format_info, format_verify, human_bytes
from cache.errors import DamagedChunk, NotACache, UserError
from cache.hdf5_store import HDF5Backend
from cache.layout import (
    BACKENDS,
    CACHE_ARRAYS,
    CHECKSUM_NAMES,
    DTYPES,
    LEGACY_CODECS,
    REQUIRED_ARRAYS,
    REQUIRED_ATTRS,
    ROW_ARRAYS,
    SCHEMA_VERSION,
    SPLITS,
    VERIFY_BATCH,
    _array_specs,
    _backend_for,
    _check_derived_attrs,
    _check_index,
    _check_shapes,
    _checked_rows,
    _index_digests,
    _read_index,
    _store_rows_as,
    check_output,
    inspect_path,
    refuse_non_cache,
)
from cache.paths import check_writable
from cache.rows import _batched, _contiguous_runs, fill_rows

__all__ = [  # the names other modules and the tests import from cache.store
    "BACKENDS", "CACHE_ARRAYS", "DTYPES", "LEGACY_CODECS", "ROW_ARRAYS", "SCHEMA_VERSION",
    "SPLITS", "Damage", "FeatureCache", "SplitData", "check_output", "fill_rows",
    "format_info", "format_verify", "human_bytes", "inspect_path", "refuse_non_cache",
]


@dataclass(frozen=True)
class SplitData:
    """One split in memory: features (n, C, T, H, W), labels (n,), the cache rows they came from."""

    features: np.ndarray | torch.Tensor
    labels: np.ndarray
    rows: np.ndarray


@dataclass(frozen=True)
class Damage:
    """One done row that is missing or damaged, and why."""

    row: int
    video_id: str
    reason: str


class FeatureCache:
    """One feature cache on disk (Zarr group or HDF5 file) behind one API for both phases."""

    def __init__(self, backend, writable: bool, index: dict[str, np.ndarray] | None = None):
        self._backend = backend
        self.writable = writable
        self.path = backend.path
        self._index = index
        stored = backend.attrs
        self._format = row_formats.stored_format(
            stored, np.dtype(backend.array("features").dtype).name)
        self.attrs = self._complete_attrs(stored)

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
        codec: str | None = None,
        store_dtype: str | None = None,
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
            overwrite: replace the cache at ``path``. Only a cache of this tool (recognised by
                its schema_version attribute) is ever replaced, and only its own entries are
                deleted; any other file or folder is refused.
            codec: the row compressor (``cache.codecs``; None: the backend's default).
            store_dtype: how rows are stored (``cache.store_dtype``: float16, float32,
                bfloat16 or int8; None: ``dtype``); they always read back as ``dtype``.
        """
        path = str(path)
        labels = _checked_rows(video_ids, splits, labels, classes, dtype)
        store_cls = _backend_for(path, backend)
        c, t, h, w = (int(v) for v in shape)
        codec = check_codec(codec, store_cls.name)
        fmt = row_formats.store_format(store_dtype, dtype)
        arrays = _array_specs(video_ids, splits, labels, (c, t, h, w), dtype, aug_views)
        _store_rows_as(arrays, fmt, codec)
        all_attrs = dict(attrs or {})
        all_attrs.update(schema_version=SCHEMA_VERSION, classes=list(classes), channels=c,
                         frames=t, height=h, width=w, dtype=dtype, aug_views=int(aug_views),
                         generation=uuid.uuid4().hex,  # readers notice a rebuild by it
                         index_sha256=_index_digests(video_ids, splits, labels),
                         codec=codec, store_dtype=fmt.name)
        found = refuse_non_cache(path, store_cls.name, what="path")
        check_writable(path, "file" if store_cls is HDF5Backend else "folder", what="cache")
        if found.state == "cache":
            if not overwrite:
                raise UserError(f"{path} already exists; open it, or pass overwrite to replace it")
            store_cls.remove(path, found, CACHE_ARRAYS)
        store = store_cls.create(path, arrays, all_attrs)
        return cls(store, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", backend: str | None = None):
        """Open an existing cache, read-only (``mode="r"``, never modifies it) or ``"r+"``.

        The metadata is checked here (see ``_validate``), so that a damaged cache is refused at
        once in one line rather than failing late in phase two.
        """
        if mode not in ("r", "r+"):
            raise ValueError("mode must be 'r' or 'r+'")
        path = str(path)
        store = _backend_for(path, backend).open(path, writable=mode == "r+")
        try:
            index = cls._validate(store)
        except UserError:
            store.close()
            raise
        return cls(store, writable=mode == "r+", index=index)

    @staticmethod
    def _validate(store) -> dict[str, np.ndarray]:
        """Refuse, in one line naming the problem, metadata that would make phase two fail late
        or silently wrong; returns the row index (ids, splits, labels) it had to read."""
        attrs = store.attrs
        if "schema_version" not in attrs:
            raise NotACache(f"{store.path} is not a feature cache (no schema_version attribute)")
        if attrs["schema_version"] != SCHEMA_VERSION:
            raise UserError(
                f"{store.path} has cache schema_version {attrs['schema_version']}; "
                f"this version reads schema_version {SCHEMA_VERSION}"
            )
        for name in REQUIRED_ARRAYS:
            if not store.has(name):
                raise UserError(f"{store.path} is missing the array '{name}' (an interrupted "
                                "creation?); create it again")
        for name in REQUIRED_ATTRS:
            if name not in attrs:
                raise UserError(f"{store.path} is missing the attribute '{name}'")
        _check_shapes(store)
        _check_derived_attrs(store, attrs)
        index = _read_index(store)
        _check_index(store.path, index, attrs["classes"])
        return index

    def close(self) -> None:
        self._backend.close()

    @property
    def generation(self) -> str | None:
        """The id this cache got when it was created (None: made before ids existed)."""
        return self.attrs.get("generation")

    def check_unchanged(self) -> None:
        """Refuse to go on when the cache was removed or created again (``--overwrite``) since
        it was opened: its rows would be other videos. Readers call it after each read batch."""
        try:
            now = self._backend.fresh_attrs()
        except (OSError, ValueError, KeyError):
            now = None
        if now is None or now.get("generation") != self.generation:
            raise UserError(f"{self.path} was removed or rebuilt (e.g. extract --overwrite) "
                            "while this command read it: its rows are no longer the ones this "
                            "command started with; run the command again")

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- description
    def _derived(self) -> dict:
        c, t, h, w = self.shape
        return {"dtype": self.dtype, "channels": c, "frames": t, "height": h, "width": w,
                "aug_views": self.aug_views, "store_dtype": self.store_dtype}

    def _complete_attrs(self, stored: dict) -> dict:
        """The stored attributes, plus those derivable from the arrays where a cache written by
        another program left them out (they agree where present: ``_validate`` checks)."""
        return {**self._derived(), **stored}

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one row."""
        return tuple(int(v) for v in self._backend.array("features").shape[1:])

    @property
    def dtype(self) -> str:
        """The dtype rows are read as: the stored float dtype, or for bfloat16 / int8 rows the
        maps' dtype they are converted back to (attribute ``dtype``)."""
        if self._format.converted:
            return str(self._backend.attrs.get("dtype", "float16"))
        return np.dtype(self._backend.array("features").dtype).name

    @property
    def store_dtype(self) -> str:
        """How the rows are stored: float16, float32, bfloat16 or int8 (``cache.store_dtype``)."""
        return self._format.name

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def aug_views(self) -> int:
        return int(self._backend.array("aug_features").shape[1]) if self.has_aug else 0

    @property
    def has_aug(self) -> bool:
        return self._backend.has("aug_features")

    @property
    def checksummed(self) -> bool:
        """Whether the row chunks carry checksums (caches made before they existed do not)."""
        return all(self._backend.checksummed(name) for name in self._row_arrays())

    def __len__(self) -> int:
        return int(self._backend.array("features").shape[0])

    def _load_index(self) -> dict[str, np.ndarray]:
        if self._index is None:
            self._index = _read_index(self._backend)
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

    def _row_arrays(self) -> tuple[str, ...]:
        """The per-row arrays to verify: the maps, and the int8 rows' (offset, scale) arrays."""
        arrays = ROW_ARRAYS if self.has_aug else ROW_ARRAYS[:1]
        if self._format.quantized:
            arrays = (*arrays, *(a + row_formats.QUANT_SUFFIX for a in arrays))
        return arrays

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
        self._write_stored("features", row, features)
        if aug is not None:
            if not self.has_aug:
                raise ValueError("this cache was created without aug_features")
            self._write_stored("aug_features", row, np.asarray(aug))
        self._backend.flush()
        self._backend.write("done", row, True)
        self._backend.flush()

    def _write_stored(self, array: str, row: int, maps: np.ndarray) -> None:
        """Write one row of ``array`` in the cache's stored form (int8: its scales first)."""
        stored, params = row_formats.encode(maps.astype(self.dtype, copy=False), self._format)
        if params is not None:
            self._backend.write(array + row_formats.QUANT_SUFFIX, row, params)
        self._backend.write(array, row, stored)

    def mark_not_done(self, rows: Sequence[int]) -> None:
        """Clear the done flags of ``rows`` (rows found damaged: they are to be written again)."""
        self._require_writable()
        for row in np.asarray(rows, dtype=np.int64).tolist():
            self._backend.write("done", row, False)
        self._backend.flush()

    def update_attrs(self, **values) -> None:
        """Add or replace attributes (JSON-compatible values)."""
        self._require_writable()
        self._backend.update_attrs(values)
        self.attrs = self._complete_attrs(self._backend.attrs)

    # ----------------------------------------------------------------- reading, verified
    def _check_done(self, rows: np.ndarray) -> None:
        done = self.done[rows] if len(rows) > 1 else self._backend.read("done", rows).astype(bool)
        if not done.all():
            missing = np.asarray(rows)[~done][:5].tolist()
            raise UserError(f"{self.path}: rows {missing} are not done (extraction unfinished)")

    def _scan(self, array: str, start: int, stop: int, index=None
              ) -> tuple[np.ndarray | None, dict[int, str]]:
        """Read rows [start, stop) of ``array`` (or ``index`` within one row) and check them:
        (block, {row: why it is damaged}); block is None when a chunk could not be decoded."""
        where = slice(start, stop) if index is None else index
        try:
            block = self._backend.read_data(array, where)
        except DamagedChunk:
            return None, self._undecodable(array, start, stop, index)
        fill = self._backend.fill_value(array)
        rows = block[None] if index is not None else block
        missing = {start + int(i): f"missing (no stored chunk: it reads as {fill})"
                   for i in fill_rows(rows, fill)}
        return block, missing

    def _undecodable(self, array: str, start: int, stop: int, index) -> dict[int, str]:
        """Which rows of a block that failed to decode are at fault, one read each."""
        damaged = {}
        for row in range(start, stop):
            try:
                self._backend.read_data(array, row if index is None else index)
            except DamagedChunk as e:
                damaged[row] = f"damaged ({e})"
        return damaged or {start: "damaged (unreadable)"}

    def _raise_damaged(self, array: str, damaged: dict[int, str]) -> None:
        row = min(damaged)
        video = self.video_ids[row]
        if not self._backend.read("done", row):
            raise UserError(f"{self.path}: row {row} ({video}) is being rewritten by another "
                            "process; read it again when that process is done")
        more = f" (and {len(damaged) - 1} more rows)" if len(damaged) > 1 else ""
        raise UserError(f"{self.path}: row {row} ({video}) of {array} is {damaged[row]}{more}; "
                        f"`python cli.py info {self.path} --verify` lists every damaged row, "
                        "and rerunning extract with --verify redoes them")

    def _read_verified(self, array: str, start: int, stop: int, index=None) -> np.ndarray:
        """Rows [start, stop) of ``array`` (or ``index`` within one row), checked, as float
        maps of the cache's dtype whatever their stored form."""
        block, damaged = self._scan(array, start, stop, index)
        params = None
        if self._format.quantized:
            params, damaged_params = self._scan(array + row_formats.QUANT_SUFFIX, start, stop,
                                                index)
            damaged = {**damaged_params, **damaged}
        if damaged:
            self._raise_damaged(array, damaged)
        return row_formats.decode(block, params, self._format, self.dtype)

    def read_row(self, row: int, view: int | None = None) -> np.ndarray:
        """One done row's (C, T, H, W) map: the cached view, or augmented view ``view``."""
        self._check_done(np.asarray([row]))
        if view is None:
            return self._read_verified("features", row, row + 1)[0]
        return self._read_verified("aug_features", row, row + 1, index=(row, view))

    def read_rows(self, rows: Sequence[int], array: str = "features", dtype: str | None = None,
                  views: Sequence[int] | None = None, check_done: bool = True) -> np.ndarray:
        """Done rows, in the order given, stacked as (n, ...) — read as few slices as possible.

        ``views`` picks one augmented view per row (from ``aug_features``). ``check_done=False``
        skips re-reading the done flags, for rows that came from ``rows(split)`` already.
        Every row is verified (checksum, missing chunk) as it is read.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if check_done:
            self._check_done(rows)
        if views is not None:
            return np.stack([
                self._read_verified("aug_features", int(r), int(r) + 1, index=(int(r), int(v)))
                for r, v in zip(rows, views)]).astype(dtype or self.dtype)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        source = self._backend.array(array)
        out = np.empty((len(rows), *source.shape[1:]), dtype=dtype or self.dtype)
        for start, stop, offset in _contiguous_runs(sorted_rows):
            out[order[offset:offset + stop - start]] = self._read_verified(array, start, stop)
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

    # ----------------------------------------------------------------- verification
    def missing_rows(self, rows: Sequence[int] | None = None) -> np.ndarray:
        """Which of ``rows`` (default: the done rows) have no stored chunk in a row array: one
        listing per array, no data read. Empty where the layout cannot tell."""
        rows = self.rows() if rows is None else np.asarray(rows, dtype=np.int64)
        missing = np.zeros(len(rows), dtype=bool)
        for array in self._row_arrays():
            stored = self._backend.stored_rows(array)
            if stored is not None:
                missing |= ~stored[rows]
        return rows[missing]

    def verify(self, rows: Sequence[int] | None = None,
               progress: Callable[[int], None] | None = None) -> list[Damage]:
        """Read and check every one of ``rows`` (default: every done row): chunks present, and
        their checksums (caches without checksums: that they decode). ``progress(n)`` is called
        after each batch of n rows. Returns the damaged rows, sorted."""
        rows = self.rows() if rows is None else np.asarray(rows, dtype=np.int64)
        damaged: dict[int, str] = {int(r): "missing (no stored chunk)"
                                   for r in self.missing_rows(rows)}
        for start, stop, _ in _batched(_contiguous_runs(np.sort(rows)), VERIFY_BATCH):
            for array in self._row_arrays():
                _, found = self._scan(array, start, stop)
                for row, reason in found.items():
                    damaged.setdefault(row, reason if array == "features" else
                                       f"{array}: {reason}")
            if progress is not None:
                progress(stop - start)
        # a row another process unmarked meanwhile is being rewritten, not damaged
        return [Damage(row, str(self.video_ids[row]), reason)
                for row, reason in sorted(damaged.items()) if self._backend.read("done", row)]

    # ----------------------------------------------------------------- summary
    def info(self) -> dict:
        """Counts per split, classes, done / not done, bytes on disk, compression ratio, and
        the done rows with no stored chunk (a cheap listing, no data read)."""
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
        itemsize = np.dtype(self.dtype).itemsize
        raw = int(done.sum()) * c * t * h * w * itemsize * (1 + self.aug_views)
        stored = self._backend.bytes_stored()
        return {
            "path": self.path,
            "backend": self.backend,
            "rows": len(self),
            "done": int(done.sum()),
            "not_done": int((~done).sum()),
            "missing_done": self.missing_rows(np.flatnonzero(done)).tolist(),
            "checksums": CHECKSUM_NAMES[self.backend] if self.checksummed else None,
            "splits": per_split,
            "classes": len(self.classes),
            "shape": [c, t, h, w],
            "dtype": self.dtype,
            "store_dtype": self.store_dtype,
            "codec": self.attrs.get("codec", LEGACY_CODECS[self.backend]),
            "aug_views": self.aug_views,
            "bytes_on_disk": stored,
            "raw_bytes_done": raw,
            "compression_ratio": (raw / stored) if stored else None,
            "attrs": self.attrs,
        }


