"""The cache's layout: its arrays and attributes, which backend a path is, the arrays a new
cache is created with, and the checks opening makes (shapes, dtype, derived attributes, labels
against classes, duplicate videos), so a damaged cache fails at open in one line."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from cache import store_dtype as row_formats
from cache.describe import human_bytes
from cache.errors import NotACache, UserError
from cache.hdf5_store import HDF5_SUFFIXES, HDF5Backend
from cache.paths import Found, check_writable
from cache.zarr_store import ZarrBackend

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
DTYPES = ("float16", "float32")
ROW_ARRAYS = ("features", "aug_features")  # per-row feature maps: checksummed, verified on read
CACHE_ARRAYS = (*ROW_ARRAYS, "video_id", "split", "label", "done",
                "features_quant", "aug_features_quant")  # int8 rows' scales (cache.store_dtype)
REQUIRED_ARRAYS = ("features", "video_id", "split", "label", "done")
# Only what cannot be derived from the arrays is required (dtype, C, T, H, W and V can).
REQUIRED_ATTRS = ("schema_version", "classes")
BACKENDS = {"zarr": ZarrBackend, "hdf5": HDF5Backend}
CHECKSUM_NAMES = {"zarr": "CRC32C", "hdf5": "Fletcher-32"}
LEGACY_CODECS = {"zarr": "blosc-zstd", "hdf5": "gzip"}  # caches made before attribute codec
VERIFY_BATCH = 16  # rows per read when verifying a whole cache (bounded memory)
MAX_ROWS = 10**8  # videos in one cache: far above any dataset (Kinetics-700: 650k)
MAX_ROW_BYTES = 2**30  # one row's maps (all views): 1.6 MB for ResNet-50, C x T x 7 x 7


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


def inspect_path(path: str | os.PathLike, backend: str | None = None) -> Found:
    """What ``path`` holds: nothing, an empty folder or file, a cache of this tool (with its
    attributes, unvalidated), or something else, which the tool never replaces."""
    return _backend_for(str(path), backend).inspect(str(path))


def refuse_non_cache(path: str | os.PathLike, backend: str | None = None,
                     what: str = "--out") -> Found:
    """What ``path`` holds, refusing at once (before any lock file or work) a path that holds
    something other than a cache of this tool: it is never written over."""
    found = inspect_path(path, backend)
    if found.state == "other":
        raise NotACache(f"{path} exists and is not a feature cache ({found.reason}); it is never "
                        f"replaced: choose another {what}")
    return found


def check_output(path: str | os.PathLike, backend: str | None = None,
                 what: str = "--out") -> None:
    """Before any work: ``path`` holds no foreign data and can be written as a cache."""
    store_cls = _backend_for(str(path), backend)
    refuse_non_cache(path, store_cls.name, what)
    check_writable(path, "file" if store_cls is HDF5Backend else "folder", what=what)


# ------------------------------------------------------------------------------ creation
def _checked_rows(video_ids, splits, labels, classes, dtype: str) -> np.ndarray:
    """The labels as int32, after checking that the per-row arguments fit together."""
    n = len(video_ids)
    if not (len(splits) == len(labels) == n):
        raise ValueError("video_ids, splits and labels must have one entry per row")
    bad_splits = sorted(set(splits) - set(SPLITS))
    if bad_splits:
        raise ValueError(f"unknown split names {bad_splits}; use {SPLITS}")
    if dtype not in DTYPES:
        raise UserError(f"cache dtype must be float16 or float32, not {dtype}")
    _check_unique_classes("a new cache", list(classes))
    labels = np.asarray(labels, dtype=np.int32)
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError("labels must index into classes")
    return labels


def _array_specs(video_ids, splits, labels: np.ndarray, shape: tuple[int, int, int, int],
                 dtype: str, aug_views: int) -> dict[str, dict]:
    """The arrays of a new cache: shape, chunks, dtype, fill value and initial data."""
    n = len(video_ids)
    arrays = {
        # NaN fill: a row whose chunk is missing reads as NaN, never as plausible zeros
        "features": dict(shape=(n, *shape), chunks=(1, *shape), dtype=dtype, fill_value=np.nan),
        "video_id": dict(shape=(n,), chunks=(max(n, 1),), dtype="str",
                         data=np.asarray(list(video_ids), dtype=object)),
        "split": dict(shape=(n,), chunks=(max(n, 1),), dtype="str",
                      data=np.asarray(list(splits), dtype=object)),
        "label": dict(shape=(n,), chunks=(max(n, 1),), dtype="int32", fill_value=-1,
                      data=labels),
        # One chunk per flag: concurrent writers of disjoint rows never share an object.
        "done": dict(shape=(n,), chunks=(1,), dtype="bool", fill_value=False),
    }
    if aug_views:
        arrays["aug_features"] = dict(shape=(n, aug_views, *shape), chunks=(1, aug_views, *shape),
                                      dtype=dtype, fill_value=np.nan)
    return arrays


def _store_rows_as(arrays: dict[str, dict], fmt, codec: str) -> None:
    """Give the row arrays of ``arrays`` the stored dtype, fill value and codec of ``fmt`` and
    ``codec``; int8 rows get their (offset, scale) companion arrays (``cache.store_dtype``)."""
    for name in ROW_ARRAYS:
        if name not in arrays:
            continue
        spec = arrays[name]
        spec.update(dtype=fmt.array_dtype, fill_value=fmt.fill_value, codec=codec)
        if fmt.quantized:
            per_channel = (*spec["shape"][:-3], 2)  # (N, [V,] C, 2)
            arrays[name + row_formats.QUANT_SUFFIX] = dict(
                shape=per_channel, chunks=(1, *per_channel[1:]), dtype="float32",
                fill_value=np.nan, codec=codec)


# ------------------------------------------------------------------------------ open-time checks
def _read_index(store) -> dict[str, np.ndarray]:
    """video_id, split and label of every row; an array that cannot be decoded, or (caches
    that record them) differs from its checksum, is refused in one line naming it."""
    index = {}
    for name in ("video_id", "split", "label"):
        try:
            index[name] = (np.asarray(store.read_strings(name), dtype=object) if name != "label"
                           else store.read(name, slice(None)).astype(np.int64))
        except (ValueError, RuntimeError, OSError) as e:  # what the decoders raise on bad bytes
            raise UserError(f"{store.path}: the {name} array is damaged and cannot be decoded "
                            f"({str(e) or type(e).__name__}); restore the cache, or extract "
                            "again with --overwrite") from None
    recorded = store.attrs.get("index_sha256")
    if isinstance(recorded, dict):
        actual = _index_digests(index["video_id"], index["split"], index["label"])
        for name in ("video_id", "split", "label"):
            if name in recorded and recorded[name] != actual[name]:
                raise UserError(f"{store.path}: the {name} array does not match its checksum "
                                "(damaged or edited since the cache was created); restore the "
                                "cache, or extract again with --overwrite")
    return index


def _index_digests(video_ids, splits, labels) -> dict[str, str]:
    """sha256 of each index array, recorded at creation: these arrays carry no chunk checksum
    (HDF5 cannot filter variable-length strings), yet a changed label silently moves a video."""
    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    return {"video_id": digest("\n".join(map(str, video_ids)).encode()),
            "split": digest("\n".join(map(str, splits)).encode()),
            "label": digest(np.asarray(labels, dtype="<i8").tobytes())}


def _check_shapes(store) -> None:
    """Every array has one entry per row, and the feature arrays the documented ranks."""
    features = store.array("features")
    if len(features.shape) != 5:
        raise UserError(f"{store.path}: features has shape {tuple(features.shape)}; a cache "
                        "holds (N, C, T, H, W)")
    n = features.shape[0]
    # Sane bounds before anything is allocated: edited metadata would otherwise pass these
    # checks and fail later as numpy's MemoryError (or a reader allocating terabytes).
    if n > MAX_ROWS:
        raise UserError(f"{store.path}: features has {n} rows, more than any dataset ({MAX_ROWS}"
                        "); its metadata was edited or damaged: restore it, or extract again")
    views = store.array("aug_features").shape[1] if store.has("aug_features") else 1
    row_bytes = int(np.prod(features.shape[1:], dtype=np.float64)) \
        * np.dtype(features.dtype).itemsize * max(1, int(views))
    if row_bytes > MAX_ROW_BYTES:
        raise UserError(f"{store.path}: one row of shape {tuple(features.shape[1:])} would take "
                        f"{human_bytes(row_bytes)}, more than the {human_bytes(MAX_ROW_BYTES)} "
                        "any feature map needs; its metadata was edited or damaged: restore "
                        "it, or extract again")
    for name in ("video_id", "split", "label", "done"):
        if tuple(store.array(name).shape) != (n,):
            raise UserError(f"{store.path}: {name} has shape {tuple(store.array(name).shape)}, "
                            f"not ({n},) like features")
    if store.has("aug_features"):
        aug = tuple(store.array("aug_features").shape)
        if len(aug) != 6 or aug[0] != n or aug[2:] != tuple(features.shape[1:]):
            raise UserError(f"{store.path}: aug_features has shape {aug}; it must be "
                            f"(N, V, C, T, H, W) with N, C, T, H, W of features")


def _check_derived_attrs(store, attrs: dict) -> None:
    """Attributes that restate the arrays (dtype, C, T, H, W, V) must agree with them."""
    features = store.array("features")
    dtype = np.dtype(features.dtype).name
    fmt = row_formats.stored_format(attrs, dtype)
    if fmt.converted:  # bfloat16 / int8 rows: stored as integers, read as attribute dtype
        if dtype != fmt.array_dtype or attrs.get("dtype") not in DTYPES:
            raise UserError(f"{store.path}: {fmt.name} rows are stored as {fmt.array_dtype} and "
                            f"read as float16 or float32, but features are {dtype} and dtype "
                            f"says {attrs.get('dtype')!r} (edited attributes?)")
        dtype = attrs["dtype"]
    elif dtype not in (*DTYPES, "float64"):
        raise UserError(f"{store.path}: features are {dtype}; a cache holds floating-point maps")
    _, c, t, h, w = (int(v) for v in features.shape)
    views = int(store.array("aug_features").shape[1]) if store.has("aug_features") else 0
    actual = {"dtype": dtype, "channels": c, "frames": t, "height": h, "width": w,
              "aug_views": views}
    for key, value in actual.items():
        if key in attrs and attrs[key] != value:
            raise UserError(f"{store.path}: attribute {key} says {attrs[key]!r} but the arrays "
                            f"hold {value!r} (edited attributes?); restore it, or extract again")


def _check_index(path: str, index: dict[str, np.ndarray], classes) -> None:
    """Labels index the class list, splits are known, and no video is listed twice."""
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{path}: attribute classes must be a list of class names")
    _check_unique_classes(path, classes)
    labels = index["label"]
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if len(bad):
        row = int(bad[0])
        raise UserError(f"{path}: row {row} has label {labels[row]}, but attribute classes "
                        f"lists {len(classes)} classes (shortened, or an unfinished creation?)")
    unknown = sorted(set(index["split"].tolist()) - set(SPLITS))
    if unknown:
        raise UserError(f"{path}: unknown split names {unknown}; a cache uses {', '.join(SPLITS)}")
    ids, counts = np.unique(index["video_id"].astype(str), return_counts=True)
    if len(ids) and counts.max() > 1:
        twice = int(np.argmax(counts > 1))
        rows = np.flatnonzero(index["video_id"] == ids[twice])[:2].tolist()
        raise UserError(f"{path}: video {ids[twice]} is listed twice (rows {rows}), so it could "
                        "be its own support; extract again with --overwrite (duplicate "
                        "split-list lines are now kept once)")


def _check_unique_classes(path: str, classes: list[str]) -> None:
    """Two classes of one name would be merged by every per-class figure (and by a reader)."""
    names, counts = np.unique(np.asarray(classes, dtype=object).astype(str), return_counts=True)
    if len(names) and counts.max() > 1:
        twice = str(names[int(np.argmax(counts > 1))])
        raise UserError(f"{path}: class {twice!r} is listed twice in attribute classes; class "
                        "names must be unique (edited attributes? extract again)")


