"""How rows are stored: the row codec (``--codec``), the stored dtype (``--store-dtype``: bfloat16
and int8 rows dequantised on read), and the synchronous row writes of the Zarr backend."""

import os

import numpy as np
import pytest
import torch
import zarr
from cache_testing import CLASSES, SHAPE, make_rows, row_values
from click.testing import CliRunner

import cli
from cache import FeatureCache, UserError
from cache.codecs import ZARR_CODECS, check_codec
from cache.store_dtype import dequantize_int8, from_bfloat16_bits, quantize_int8, to_bfloat16_bits
from cache.zarr_store import ZarrBackend


def relu_rows(n: int, shape=SHAPE, seed: int = 0) -> np.ndarray:
    """ReLU-like float16 maps: non-negative, about half zeros, channels of different scales."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 4.0, size=(1, shape[0], 1, 1, 1))
    rows = np.maximum(rng.normal(-0.1, 1.0, size=(n, *shape)), 0) * scale
    return rows.astype(np.float16)


def new_cache(path, backend="zarr", aug_views=0, **kwargs) -> FeatureCache:
    video_ids, splits, labels = make_rows()
    return FeatureCache.create(path, video_ids=video_ids, splits=splits, labels=labels,
                               classes=CLASSES, shape=SHAPE, backend=backend,
                               aug_views=aug_views, **kwargs)


# ------------------------------------------------------------------------------ codecs
@pytest.mark.parametrize("codec", list(ZARR_CODECS))
def test_every_codec_stores_rows_exactly_and_is_recorded(tmp_path, codec):
    path = tmp_path / "c.zarr"
    with new_cache(path, codec=codec) as cache:
        for row in range(9):
            cache.write_row(row, row_values(row))
    with FeatureCache.open(path) as cache:  # readers need no option: the codec is in the arrays
        assert cache.attrs["codec"] == codec and cache.info()["codec"] == codec
        assert np.array_equal(cache.read_rows(range(9)),
                              np.stack([row_values(r) for r in range(9)]).astype(np.float16))
        assert cache.checksummed
    # plain zarr reads it too
    assert np.array_equal(zarr.open_group(str(path), mode="r")["features"][3],
                          row_values(3).astype(np.float16))


def test_codec_choices_are_checked_per_backend():
    assert check_codec(None, "zarr") == "zstd" and check_codec(None, "hdf5") == "gzip"
    with pytest.raises(UserError, match="is for the zarr backend"):
        check_codec("lz4", "hdf5")
    with pytest.raises(UserError, match="unknown --codec 'brotli'"):
        check_codec("brotli", "zarr")


def test_a_damaged_chunk_of_any_codec_is_reported(tmp_path):
    path = tmp_path / "c.zarr"
    with new_cache(path, codec="lz4") as cache:
        cache.write_row(1, row_values(1))
    chunk = path / "features" / "c" / "1" / "0" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with FeatureCache.open(path) as cache, pytest.raises(UserError, match="row 1"):
        cache.read_row(1)


# ------------------------------------------------------------------------------ row writes
def test_synchronous_row_writes_store_the_bytes_zarr_would(tmp_path):
    """Each row chunk written by the fast path equals, byte for byte, what zarr's own
    ``array[row] = value`` stores; done flags set and cleared the same way."""
    rows = relu_rows(9)
    paths = {}
    for fast in (True, False):
        paths[fast] = tmp_path / f"{fast}.zarr"
        with new_cache(paths[fast]) as cache:
            if not fast:
                cache._backend._sync_rows = {"features": False, "done": False}
            assert cache._backend._row_writes("features") == fast
            for row in range(9):
                cache.write_row(row, rows[row])
            cache.mark_not_done([2])
    for row in range(9):
        key = os.path.join("features", "c", str(row), "0", "0", "0", "0")
        assert (paths[True] / key).read_bytes() == (paths[False] / key).read_bytes()
    for fast in (True, False):
        with FeatureCache.open(paths[fast]) as cache:
            assert cache.done.tolist() == [r != 2 for r in range(9)]
            # single-row reads decode in this thread what zarr decodes
            backend = cache._backend
            assert backend._row_writes("done") and backend._row_writes("features")
            assert [bool(backend.read("done", r)) for r in range(9)] == [r != 2 for r in
                                                                        range(9)]
            np.testing.assert_array_equal(backend.read("features", 5),
                                          backend.array("features")[5])
    assert sorted(os.listdir(paths[True] / "done" / "c")) == \
        sorted(os.listdir(paths[False] / "done" / "c"))


def test_a_row_of_fill_values_is_not_stored(tmp_path):
    """As zarr does with write_empty_chunks off: a row equal to the fill value leaves no chunk,
    so it reads as missing rather than as a stored row."""
    path = tmp_path / "c.zarr"
    with new_cache(path) as cache:
        cache._backend.write("features", 4, np.full(SHAPE, np.nan, np.float16))
        assert not cache._backend.stored_rows("features")[4]


def test_stores_without_the_synchronous_protocol_use_zarrs_own_path():
    backend = ZarrBackend(zarr.open_group(zarr.storage.MemoryStore(), mode="w"), "memory")
    array = backend.group.create_array("features", shape=(2, 3), chunks=(1, 3), dtype="float16")
    assert backend._row_writes("features")  # MemoryStore has set_sync
    backend.write("features", 1, np.ones(3))
    assert np.array_equal(array[1], np.ones(3))
    backend.group.create_array("whole", shape=(2, 3), chunks=(2, 3), dtype="float16")
    assert not backend._row_writes("whole")  # chunks of two rows: zarr's own path


# ------------------------------------------------------------------------------ store dtypes
def test_bfloat16_bits_round_to_nearest_even_like_torch():
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    expected = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(from_bfloat16_bits(to_bfloat16_bits(x), "float32"), expected)


@pytest.mark.parametrize("mode", ["affine", "symmetric"])
def test_int8_round_trip_error_is_at_most_half_a_step_per_channel(mode):
    x = relu_rows(4, shape=(8, 4, 3, 3)).astype(np.float32)
    codes, params = quantize_int8(x, mode)
    assert codes.dtype == np.int8 and codes.min() >= -127 and params.shape == (4, 8, 2)
    back = dequantize_int8(codes, params, "float32")
    step = params[..., 1][..., None, None, None]
    assert (np.abs(back - x) <= step / 2 * (1 + 1e-5) + 1e-7).all()
    expected_step = (x.max(axis=(2, 3, 4)) - (x.min(axis=(2, 3, 4)) if mode == "affine" else 0)) \
        / (254 if mode == "affine" else 127)
    assert np.allclose(params[..., 1], expected_step)


def test_a_constant_channel_is_exact_in_int8():
    x = np.zeros((2, 3, 2, 2), np.float32)
    x[1] = 2.5
    codes, params = quantize_int8(x)
    assert np.array_equal(dequantize_int8(codes, params, "float32"), x)


@pytest.mark.parametrize("store_dtype, bound", [("bfloat16", 2 ** -8), ("int8", None)])
def test_compact_rows_read_back_as_float_rows_on_every_path(tmp_path, backend, store_dtype,
                                                            bound):
    path = tmp_path / ("c.h5" if backend == "hdf5" else "c.zarr")
    rows = relu_rows(9)
    aug = relu_rows(9 * 2, seed=1).reshape(9, 2, *SHAPE)
    with new_cache(path, backend=backend, aug_views=2, store_dtype=store_dtype) as cache:
        for row in range(9):
            cache.write_row(row, rows[row], aug[row])
    with FeatureCache.open(path) as cache:
        assert cache.dtype == "float16" and cache.store_dtype == store_dtype
        assert cache.attrs["store_dtype"] == store_dtype
        info = cache.info()
        assert info["store_dtype"] == store_dtype and info["dtype"] == "float16"
        assert f"stored     {store_dtype} (read as float16)" in cli.format_info(info)
        reads = {
            "read_row": np.stack([cache.read_row(r) for r in range(9)]),
            "read_rows": cache.read_rows(range(9)),
            "load_split": np.concatenate([cache.load_split(s).features
                                          for s in ("train", "val", "test")]),
        }
        order = np.concatenate([cache.rows(s) for s in ("train", "val", "test")])
        reads["load_split"] = reads["load_split"][np.argsort(order)]
        views = cache.read_rows(range(9), views=[1] * 9)
        assert not cache.verify()
    x = rows.astype(np.float32)
    for name, got in reads.items():
        assert got.dtype == np.float16, name
        error = np.abs(got.astype(np.float32) - x)
        if bound is not None:  # bfloat16: 8 significant bits, then float16's own rounding
            assert (error <= bound * x + 1e-7).all(), name
        else:  # int8: half a step of each video's channel, plus float16's rounding
            step = (x.max(axis=(2, 3, 4)) - x.min(axis=(2, 3, 4)))[..., None, None, None] / 254
            assert (error <= step / 2 + 2 ** -11 * x + 1e-6).all(), name
    assert views.dtype == np.float16
    assert np.abs(views.astype(np.float32) - aug[:, 1].astype(np.float32)).max() < 0.05


def test_int8_rows_with_missing_scales_are_reported_not_read(tmp_path):
    path = tmp_path / "c.zarr"
    with new_cache(path, store_dtype="int8") as cache:
        cache.write_row(0, row_values(0))
    scales = path / "features_quant" / "c" / "0" / "0" / "0"
    os.remove(scales)
    with FeatureCache.open(path) as cache:
        assert [d.row for d in cache.verify()] == [0]
        with pytest.raises(UserError, match="row 0"):
            cache.read_row(0)


def test_int8_rows_take_about_half_the_float16_bytes(tmp_path):
    """Uncompressed (codec none), so that only the stored form differs: int8 codes plus 8 bytes
    of (offset, scale) per channel against 2 bytes per value."""
    shape = (16, 8, 7, 7)
    rows = relu_rows(9, shape=shape)
    sizes = {}
    for store_dtype in ("float16", "int8"):
        path = tmp_path / f"{store_dtype}.zarr"
        video_ids, splits, labels = make_rows()
        with FeatureCache.create(path, video_ids=video_ids, splits=splits, labels=labels,
                                 classes=CLASSES, shape=shape, codec="none",
                                 store_dtype=store_dtype) as cache:
            for row in range(9):
                cache.write_row(row, rows[row])
        group = zarr.open_group(str(path), mode="r")
        sizes[store_dtype] = sum(group[name].nbytes_stored() for name in group.array_keys()
                                 if name.startswith("features"))
    assert sizes["int8"] < 0.52 * sizes["float16"]


def test_unknown_store_dtype_is_one_line():
    result = CliRunner().invoke(cli.cli, ["extract", "--dataset", "custom", "--store-dtype",
                                          "int4"])
    assert result.exit_code == 2 and "int4" in result.output
    with pytest.raises(UserError, match="unknown --store-dtype 'int4'"):
        new_cache("/tmp/never-made.zarr", store_dtype="int4")
