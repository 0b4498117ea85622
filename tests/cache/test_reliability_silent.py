"""Issue 10, silent wrong results (cache part): a done row promises intact bytes (missing,
truncated and forged rows are named in one line, `info --verify` lists them), caches written by
other programs to the documented schema are read correctly, a video is never listed twice."""

import os

import h5py
import numpy as np
import pytest
import zarr
from cache_testing import CLASSES, SHAPE, make_rows, row_values
from click.testing import CliRunner

import cli
from cache import FeatureCache, UserError
from cache.codecs import zarr_row_compressors
from cache.store import fill_rows


def filled(cache_path, backend, rows=range(6), n=9):
    video_ids, splits, labels = make_rows(n)
    with FeatureCache.create(cache_path, video_ids=video_ids, splits=splits, labels=labels,
                             classes=CLASSES, shape=SHAPE, backend=backend) as cache:
        for row in rows:
            cache.write_row(row, row_values(row))


def forge_done(cache_path, row):
    """What a stale or forged done flag looks like: the flag set, the row never written."""
    with FeatureCache.open(cache_path, mode="r+") as cache:
        cache._backend.write("done", row, True)


def zarr_chunk(cache_path, row, array="features"):
    return os.path.join(cache_path, array, "c", str(row), *["0"] * (len(SHAPE)))


def damage_chunk(cache_path, backend, row):
    """Flip a byte in the middle of a row's stored chunk (a bad disk, a bad copy)."""
    if backend == "zarr":
        path, offset = zarr_chunk(cache_path, row), None
        size = os.path.getsize(path)
    else:
        with h5py.File(cache_path, "r") as f:
            info = f["features"].id.get_chunk_info_by_coord((row, 0, 0, 0, 0))
        path, offset, size = cache_path, info.byte_offset, info.size
    with open(path, "r+b") as f:
        position = (offset or 0) + size // 2
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0xFF]))


def info_cli(*args):
    return CliRunner().invoke(cli.cli, ["info", *map(str, args)])


@pytest.mark.slow
def test_a_forged_done_flag_is_named_on_read_and_by_info(cache_path, backend):
    filled(cache_path, backend)
    forge_done(cache_path, 7)  # row 7 (run/v007) was never written: a failed video
    with FeatureCache.open(cache_path) as cache:
        assert cache.info()["missing_done"] == [7]
        with pytest.raises(UserError, match=r"row 7 \(run/v007\) of features is missing"):
            cache.read_row(7)
        with pytest.raises(UserError, match="row 7"):
            cache.load_split("val")  # rows 1, 4, 7
        np.testing.assert_array_equal(cache.read_rows([1, 4]),
                                      np.stack([row_values(1), row_values(4)]).astype("float16"))
        assert [(d.row, d.video_id) for d in cache.verify()] == [(7, "run/v007")]
    summary = info_cli(cache_path)
    assert summary.exit_code == 0 and "1 done rows have no stored features" in summary.output


def test_a_deleted_zarr_chunk_is_not_read_as_zeros(tmp_path):
    cache_path = str(tmp_path / "deleted.zarr")  # (HDF5 chunks cannot be deleted by hand)
    filled(cache_path, "zarr")
    os.remove(zarr_chunk(cache_path, 3))
    with FeatureCache.open(cache_path) as cache:
        with pytest.raises(UserError, match=r"row 3 \(jump/v003\) of features is missing"):
            cache.load_split("train")  # rows 0, 3
        assert [d.row for d in cache.verify()] == [3]


def test_a_damaged_chunk_is_named_in_one_line(cache_path, backend):
    filled(cache_path, backend)
    damage_chunk(cache_path, backend, 4)
    with FeatureCache.open(cache_path) as cache:
        with pytest.raises(UserError, match=r"row 4 \(run/v004\) of features is damaged"):
            cache.read_rows([3, 4, 5])
        with pytest.raises(UserError, match="row 4"):
            cache.read_row(4)
        np.testing.assert_array_equal(cache.read_row(5), row_values(5).astype("float16"))
        (damage,) = cache.verify()
    assert damage.row == 4 and "checksum" in damage.reason
    result = info_cli(cache_path, "--verify")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "verify     5 of 6 done rows intact" in result.output
    assert "row 4 run/v004: damaged" in result.output
    assert "1 done rows of" in result.output and "rerun the extract command" in result.output


def test_a_truncated_zarr_chunk_names_its_row_not_a_blosc_error(tmp_path):
    path = str(tmp_path / "t.zarr")
    filled(path, "zarr")
    chunk = zarr_chunk(path, 2)
    data = open(chunk, "rb").read()
    for keep in (3, len(data) // 2, len(data) - 1):  # blosc errors, garbage, a silent short read
        with open(chunk, "wb") as f:
            f.write(data[:keep])
        with FeatureCache.open(path) as cache, pytest.raises(UserError, match="row 2") as err:
            cache.read_row(2)
        assert "\n" not in err.value.message


def test_aug_views_are_verified_too(tmp_path):
    path = str(tmp_path / "aug.zarr")
    video_ids, splits, labels = make_rows(3)
    with FeatureCache.create(path, video_ids=video_ids, splits=splits, labels=labels,
                             classes=CLASSES, shape=SHAPE, aug_views=2) as cache:
        for row in range(3):
            cache.write_row(row, row_values(row), aug=np.stack([row_values(9), row_values(8)]))
    os.remove(zarr_chunk(path, 1, "aug_features") + "/0")
    with FeatureCache.open(path) as cache:
        with pytest.raises(UserError, match="row 1 .* of aug_features is missing"):
            cache.read_rows([0, 1], views=[1, 0], check_done=False)
        assert [(d.row, d.reason) for d in cache.verify()] == [(1, "missing (no stored chunk)")]


def test_verify_passes_an_intact_cache_and_reads_stay_exact(cache_path, backend):
    filled(cache_path, backend, rows=range(9))
    result = info_cli(cache_path, "--verify")
    assert result.exit_code == 0, result.output
    assert "verify     9 of 9 done rows intact (stored, checksums match)" in result.output
    assert "integrity  " in result.output and "checksum per row" in result.output
    with FeatureCache.open(cache_path) as cache:
        np.testing.assert_array_equal(cache.load_split("test").features,
                                      np.stack([row_values(r) for r in (2, 5, 8)]).astype(
                                          "float16"))


# --------------------------------------------------------------------- other programs' caches
def documented_attrs(**extra):
    return {"schema_version": 1, "classes": CLASSES, **extra}


def foreign_zarr(path, *, done_rows, old_style=False):
    """A cache written with plain zarr to the schema of docs/cache.md, with zarr's default chunks
    (one chunk for the whole `done` array) and only the attributes that cannot be derived.
    ``old_style``: this tool's layout before checksums (zero fill, no CRC32C)."""
    video_ids, splits, labels = make_rows()
    n = len(video_ids)
    group = zarr.open_group(path, mode="w-", attributes=documented_attrs())
    kwargs = (dict(chunks=(1, *SHAPE), compressors=zarr_row_compressors("blosc-zstd", False),
                   fill_value=0,
                   chunk_key_encoding={"name": "default", "separator": "/"}) if old_style
              else {})
    features = group.create_array("features", shape=(n, *SHAPE), dtype="float16", **kwargs)
    group.create_array("video_id", shape=(n,), dtype=str)[:] = np.asarray(video_ids, dtype=object)
    group.create_array("split", shape=(n,), dtype=str)[:] = np.asarray(splits, dtype=object)
    group.create_array("label", shape=(n,), dtype="int32")[:] = labels
    done = group.create_array("done", shape=(n,), dtype="bool",
                              **({"chunks": (1,)} if old_style else {}))
    for row in done_rows:
        features[row] = row_values(row)
    done[list(done_rows)] = True


def test_a_cache_with_zarr_default_chunks_and_no_derivable_attrs_is_read_correctly(tmp_path):
    path = str(tmp_path / "theirs.zarr")
    foreign_zarr(path, done_rows=[0, 2, 5])
    with FeatureCache.open(path) as cache:
        assert cache.done.tolist() == [r in (0, 2, 5) for r in range(9)]
        assert cache.rows("test").tolist() == [2, 5]
        assert cache.attrs["dtype"] == "float16" and cache.attrs["frames"] == SHAPE[1]
        np.testing.assert_array_equal(cache.load_split("test").features,
                                      np.stack([row_values(2), row_values(5)]).astype("float16"))
    result = info_cli(path)
    assert result.exit_code == 0, result.output
    assert "rows       9 (3 done, 6 not done)" in result.output
    assert "features   C=6 T=4 H=3 W=3 float16" in result.output


def test_an_hdf5_cache_of_another_program_with_plain_attributes(tmp_path):
    path = str(tmp_path / "theirs.h5")
    video_ids, splits, labels = make_rows()
    with h5py.File(path, "w") as f:
        f.attrs["schema_version"] = 1  # plain HDF5 values, not JSON strings
        f.attrs["classes"] = np.asarray(CLASSES, dtype="S")
        f["features"] = np.stack([row_values(r) for r in range(9)]).astype("float32")
        f["video_id"] = np.asarray(video_ids, dtype="S")
        f["split"] = np.asarray(splits, dtype="S")
        f["label"] = np.asarray(labels, dtype="int32")
        f["done"] = np.ones(9, dtype=bool)
    with FeatureCache.open(path) as cache:
        assert cache.classes == CLASSES and cache.attrs["dtype"] == "float32"
        np.testing.assert_array_equal(cache.read_row(4), row_values(4))
        assert cache.verify() == []
    assert info_cli(path).exit_code == 0


def test_old_caches_without_checksums_open_and_missing_rows_are_still_found(tmp_path):
    path = str(tmp_path / "old.zarr")
    foreign_zarr(path, done_rows=range(6), old_style=True)
    os.remove(zarr_chunk(path, 1))
    with FeatureCache.open(path) as cache:
        assert not cache.checksummed
        assert cache.info()["missing_done"] == [1]
        np.testing.assert_array_equal(cache.read_row(0), row_values(0).astype("float16"))
        with pytest.raises(UserError, match="row 1 .* missing .* reads as 0"):
            cache.read_row(1)  # the all-zero fill of an old cache is not taken for features
        assert [d.row for d in cache.verify()] == [1]
    result = info_cli(path, "--verify")
    assert result.exit_code == 1
    assert "no checksums" in result.output and "stored and decodable" in result.output


def test_a_cache_listing_a_video_twice_is_refused_at_open(tmp_path):
    path = str(tmp_path / "twice.zarr")
    video_ids, splits, labels = make_rows(6)
    video_ids[4] = video_ids[1]  # made before split lists were deduplicated
    FeatureCache.create(path, video_ids=video_ids, splits=splits, labels=labels,
                        classes=CLASSES, shape=SHAPE).close()
    with pytest.raises(UserError, match=r"run/v001 is listed twice \(rows \[1, 4\]\)"):
        FeatureCache.open(path)


@pytest.mark.parametrize("fill", [np.nan, 0.0])
def test_fill_rows_equals_the_direct_definition(fill):
    """The sampled pre-check never changes the answer: rows equal to the fill everywhere."""
    rng = np.random.default_rng(0)
    block = rng.standard_normal((64, 3, 37)).astype(np.float16)  # (n, ...), 111 values a row
    block[rng.random(64) < 0.3] = fill  # missing rows
    for row in rng.choice(64, 12, replace=False):  # real rows that look missing where sampled
        flat = block[row].reshape(-1)
        flat[::max(1, flat.size // 16)] = fill
        flat[rng.integers(0, flat.size, 3)] = fill
    direct = [i for i in range(64)
              if (np.isnan(block[i]) if np.isnan(fill) else block[i] == fill).all()]
    assert fill_rows(block, fill).tolist() == direct and 0 < len(direct) < 64
    assert fill_rows(block, None).tolist() == []


def test_stored_rows_from_one_listing_equal_a_check_of_each_row(cache_path, backend):
    filled(cache_path, backend, rows=[0, 2, 3, 7])
    with FeatureCache.open(cache_path) as cache:
        listed = cache._backend.stored_rows("features").tolist()
    if backend == "zarr":
        direct = [os.path.exists(zarr_chunk(cache_path, row)) for row in range(9)]
    else:
        with h5py.File(cache_path, "r") as f:
            direct = [f["features"].id.get_chunk_info_by_coord((row, 0, 0, 0, 0)).byte_offset
                      is not None for row in range(9)]
    assert listed == direct == [row in (0, 2, 3, 7) for row in range(9)]
