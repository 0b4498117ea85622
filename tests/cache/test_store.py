"""The cache contract: round trips, done flags, crash safety, concurrent writers, clear errors."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_testing import CLASSES, SHAPE, make_rows, row_values
from click.testing import CliRunner

import cli
from cache import FeatureCache, UserError

WRITER = str(Path(__file__).with_name("writer_process.py"))


def fill(cache, rows):
    for row in rows:
        cache.write_row(row, row_values(row))


def tree_digest(path: str) -> str:
    """A hash of every file's name, size, mtime and bytes under path (or of the file itself)."""
    digest = hashlib.sha256()
    paths = [Path(path)] if os.path.isfile(path) else sorted(Path(path).rglob("*"))
    for p in paths:
        if p.is_file():
            st = p.stat()
            digest.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
            digest.update(p.read_bytes())
    return digest.hexdigest()


def test_round_trip_values_dtypes_and_attrs(empty_cache, cache_path, backend):
    fill(empty_cache, range(9))
    empty_cache.update_attrs(errors=[{"video": "run/v001", "reason": "truncated"}])
    empty_cache.close()

    cache = FeatureCache.open(cache_path)
    assert cache.backend == backend
    assert cache.shape == SHAPE and len(cache) == 9
    assert cache.classes == CLASSES
    video_ids, splits, labels = make_rows()
    assert list(cache.video_ids) == video_ids
    assert list(cache.splits) == splits
    assert cache.labels.tolist() == labels
    assert cache.attrs["mean"] == [0.485, 0.456, 0.406]
    assert cache.attrs["errors"] == [{"video": "run/v001", "reason": "truncated"}]
    assert cache.attrs["schema_version"] == 1 and cache.attrs["frames"] == SHAPE[1]
    for row in range(9):
        got = cache.read_row(row)
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, row_values(row).astype(np.float16))
    cache.close()


def test_float32_cache_keeps_float32(tmp_path):
    video_ids, splits, labels = make_rows(3)
    cache = FeatureCache.create(tmp_path / "f32.zarr", video_ids=video_ids, splits=splits,
                                labels=labels, classes=CLASSES, shape=SHAPE, dtype="float32")
    values = row_values(0) + 1e-4  # not representable in float16
    cache.write_row(0, values)
    assert cache.read_row(0).dtype == np.float32
    np.testing.assert_array_equal(cache.read_row(0), values)


def test_rows_lists_only_done_rows_and_unfinished_rows_are_never_read(empty_cache):
    assert empty_cache.rows("train").tolist() == []
    fill(empty_cache, [0, 4, 6])
    assert empty_cache.rows("train").tolist() == [0, 6]
    assert empty_cache.rows("val").tolist() == [4]
    assert empty_cache.rows("train", done_only=False).tolist() == [0, 3, 6]
    with pytest.raises(UserError, match="not done"):
        empty_cache.read_row(3)
    with pytest.raises(UserError, match="not done"):
        empty_cache.read_rows([0, 3])


def test_a_failed_rewrite_leaves_the_row_not_done(empty_cache, monkeypatch):
    fill(empty_cache, [0])
    assert empty_cache.done[0]
    backend = empty_cache._backend
    real_write = backend.write

    def crash_on_features(name, index, value):
        if name == "features":
            raise KeyboardInterrupt  # the writer dies half-way through the new row
        real_write(name, index, value)

    monkeypatch.setattr(backend, "write", crash_on_features)
    with pytest.raises(KeyboardInterrupt):
        empty_cache.write_row(0, row_values(5))
    assert not empty_cache.done[0]  # the stale old row is no longer served


def test_a_new_row_is_done_only_after_its_features_are_written(empty_cache, monkeypatch):
    order = []
    backend = empty_cache._backend
    real_write = backend.write
    monkeypatch.setattr(backend, "write",
                        lambda name, index, value: (order.append(name),
                                                    real_write(name, index, value)))
    empty_cache.write_row(2, row_values(2))
    assert order == ["features", "done"]


def test_load_split_equals_row_by_row_reads(empty_cache, cache_path):
    fill(empty_cache, [0, 1, 3, 6, 7, 8])  # train rows 0, 3, 6 done; gaps elsewhere
    empty_cache.close()
    cache = FeatureCache.open(cache_path)
    for split in ("train", "val", "test"):
        data = cache.load_split(split)
        assert data.rows.tolist() == cache.rows(split).tolist()
        expected = np.stack([cache.read_row(r) for r in data.rows])
        np.testing.assert_array_equal(data.features, expected)
        assert data.labels.tolist() == cache.labels[data.rows].tolist()
    as_torch = cache.load_split("train", as_torch=True, dtype="float32", device="cpu")
    assert isinstance(as_torch.features, torch.Tensor)
    assert as_torch.features.dtype == torch.float32
    assert as_torch.features.shape == (3, *SHAPE)
    shuffled = [6, 0, 3]
    np.testing.assert_array_equal(cache.read_rows(shuffled),
                                  np.stack([cache.read_row(r) for r in shuffled]))
    cache.close()


def test_aug_views_round_trip(tmp_path, backend):
    video_ids, splits, labels = make_rows(3)
    path = tmp_path / ("aug.h5" if backend == "hdf5" else "aug.zarr")
    cache = FeatureCache.create(path, video_ids=video_ids, splits=splits, labels=labels,
                                classes=CLASSES, shape=SHAPE, aug_views=2, backend=backend)
    views = np.stack([row_values(10), row_values(20)])
    cache.write_row(1, row_values(1), aug=views)
    assert cache.aug_views == 2
    np.testing.assert_array_equal(cache.read_row(1, view=1), row_values(20).astype(np.float16))
    np.testing.assert_array_equal(cache.read_rows([1], array="aug_features")[0],
                                  views.astype(np.float16))
    cache.close()


def test_opening_read_only_never_modifies_the_cache(empty_cache, cache_path):
    fill(empty_cache, [0, 1])
    empty_cache.close()
    before = tree_digest(cache_path)
    time.sleep(0.01)
    cache = FeatureCache.open(cache_path)
    cache.load_split("train")
    cache.info()
    with pytest.raises(UserError, match="read-only"):
        cache.write_row(2, row_values(2))
    cache.close()
    assert tree_digest(cache_path) == before


def test_info_counts(empty_cache):
    fill(empty_cache, [0, 1, 3])
    info = empty_cache.info()
    assert info["rows"] == 9 and info["done"] == 3 and info["not_done"] == 6
    assert info["splits"]["train"] == {"videos": 3, "done": 2, "classes": 1}
    assert info["splits"]["val"]["done"] == 1
    assert info["bytes_on_disk"] > 0
    assert info["classes"] == 3


def test_cli_info_prints_the_summary(empty_cache, cache_path):
    fill(empty_cache, [0])
    empty_cache.close()
    result = CliRunner().invoke(cli.cli, ["info", cache_path])
    assert result.exit_code == 0, result.output
    assert "rows       9 (1 done, 8 not done)" in result.output
    assert "train" in result.output and "backbone   resnet50" in result.output


def test_fsspec_urls_open_natively(tmp_path):
    video_ids, splits, labels = make_rows(3)
    memory = FeatureCache.create("memory://shared-cache", video_ids=video_ids, splits=splits,
                                 labels=labels, classes=CLASSES, shape=SHAPE)
    memory.write_row(2, row_values(2))
    np.testing.assert_array_equal(memory.load_split("test").features[0],
                                  row_values(2).astype(np.float16))

    url = f"file://{tmp_path}/remote.zarr"
    FeatureCache.create(url, video_ids=video_ids, splits=splits, labels=labels,
                        classes=CLASSES, shape=SHAPE).write_row(1, row_values(1))
    reopened = FeatureCache.open(url)
    assert reopened.rows("val").tolist() == [1]
    np.testing.assert_array_equal(reopened.read_row(1), row_values(1).astype(np.float16))
    # the same store through its plain path
    assert FeatureCache.open(tmp_path / "remote.zarr").rows().tolist() == [1]


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: None, "no cache at"),
    (lambda p: p.mkdir(), "is not a feature cache"),
    (lambda p: p.write_text("hello"), "is not a feature cache"),
])
def test_bad_paths_give_one_line_errors(tmp_path, make_bad, message):
    path = tmp_path / "thing"
    make_bad(path)
    with pytest.raises(UserError, match=message):
        FeatureCache.open(path)
    result = CliRunner().invoke(cli.cli, ["info", str(path)])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_hdf5_paths_give_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no cache at"):
        FeatureCache.open(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(UserError, match="is not a feature cache"):
        FeatureCache.open(tmp_path / "text.h5")


def test_schema_mismatch_and_missing_arrays_are_named(empty_cache, cache_path, backend):
    empty_cache._backend.update_attrs({"schema_version": 99})
    empty_cache.close()
    with pytest.raises(UserError, match="schema_version 99"):
        FeatureCache.open(cache_path)

    video_ids, splits, labels = make_rows(3)
    other = cache_path.replace("feats", "other")
    cache = FeatureCache.create(other, video_ids=video_ids, splits=splits, labels=labels,
                                classes=CLASSES, shape=SHAPE, backend=backend)
    if backend == "zarr":
        del cache._backend.group["done"]
    else:
        del cache._backend.file["done"]
    cache.close()
    with pytest.raises(UserError, match="missing the array 'done'"):
        FeatureCache.open(other)


def test_creating_over_an_existing_cache_needs_overwrite(empty_cache, cache_path, backend):
    empty_cache.close()
    video_ids, splits, labels = make_rows(3)
    kwargs = dict(video_ids=video_ids, splits=splits, labels=labels, classes=CLASSES,
                  shape=SHAPE, backend=backend)
    with pytest.raises(UserError, match="already exists"):
        FeatureCache.create(cache_path, **kwargs)
    FeatureCache.create(cache_path, overwrite=True, **kwargs).close()
    assert len(FeatureCache.open(cache_path)) == 3


def run_writer(path, first, stop, delay=0.0, step=1):
    args = [sys.executable, WRITER, path, str(first), str(stop), str(delay), str(step)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def test_a_writer_killed_mid_way_then_resumed_leaves_every_row_intact(tmp_path, backend):
    n = 40
    shape = (64, 4, 8, 8)  # rows large enough that a kill can land inside a write
    path = str(tmp_path / ("big.h5" if backend == "hdf5" else "big.zarr"))
    FeatureCache.create(path, video_ids=[f"c/v{i}" for i in range(n)], splits=["train"] * n,
                        labels=[0] * n, classes=["c"], shape=shape, backend=backend).close()
    writer = run_writer(path, 0, n, delay=0.01)
    for _ in range(5):  # let it write a few rows
        writer.stdout.readline()
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    partial = FeatureCache.open(path)
    done_before = partial.rows().tolist()
    partial.close()
    assert 5 <= len(done_before) < n

    resumed = run_writer(path, 0, n)
    rewritten = [int(line) for line in resumed.stdout]
    assert resumed.wait() == 0
    assert set(rewritten).isdisjoint(done_before)  # done rows were not redone

    cache = FeatureCache.open(path)
    assert cache.rows().tolist() == list(range(n))
    for row in range(n):
        np.testing.assert_array_equal(cache.read_row(row),
                                      row_values(row, shape).astype(np.float16))
    cache.close()


def test_two_processes_write_disjoint_rows_of_one_zarr_store(tmp_path):
    n = 60
    path = str(tmp_path / "shared.zarr")
    FeatureCache.create(path, video_ids=[f"c/v{i}" for i in range(n)], splits=["train"] * n,
                        labels=[0] * n, classes=["c"], shape=SHAPE).close()
    # interleaved rows, so the two writers' done flags are neighbours all the way through
    writers = [run_writer(path, rank, n, step=2) for rank in (0, 1)]
    assert [w.wait() for w in writers] == [0, 0]
    cache = FeatureCache.open(path)
    assert cache.rows().tolist() == list(range(n))
    for row in range(n):
        np.testing.assert_array_equal(cache.read_row(row), row_values(row).astype(np.float16))


def test_hdf5_refuses_a_second_writer_with_a_clear_message(tmp_path):
    video_ids, splits, labels = make_rows(3)
    path = str(tmp_path / "single.h5")
    writer = FeatureCache.create(path, video_ids=video_ids, splits=splits, labels=labels,
                                 classes=CLASSES, shape=SHAPE)
    second = subprocess.run([sys.executable, "-c", (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from cache import FeatureCache, UserError\n"
        f"try: FeatureCache.open({path!r}, mode='r+')\n"
        "except UserError as e: print(e.message)\n"
    )], capture_output=True, text=True)
    writer.close()
    assert "in use by another process" in second.stdout
    assert "one writer at a time" in second.stdout


def test_done_flags_read_by_listing_match_the_stored_array(empty_cache):
    fill(empty_cache, [0, 2, 5, 8])
    empty_cache._backend.write("done", 2, False)
    stored = empty_cache._backend.read("done", slice(None)).astype(bool)
    assert stored.tolist() == [i in (0, 5, 8) for i in range(9)]
    np.testing.assert_array_equal(empty_cache.done, stored)


def test_update_attrs_keeps_keys_another_writer_added(tmp_path):
    video_ids, splits, labels = make_rows(3)
    path = tmp_path / "attrs.zarr"
    first = FeatureCache.create(path, video_ids=video_ids, splits=splits, labels=labels,
                                classes=CLASSES, shape=SHAPE)
    second = FeatureCache.open(path, mode="r+")
    second.update_attrs(errors_rank1=["b/v1"])
    first.update_attrs(errors_rank0=["a/v0"])
    attrs = FeatureCache.open(path).attrs
    assert attrs["errors_rank0"] == ["a/v0"] and attrs["errors_rank1"] == ["b/v1"]


def test_read_rows_picks_one_augmented_view_per_row(tmp_path):
    video_ids, splits, labels = make_rows(3)
    cache = FeatureCache.create(tmp_path / "views.zarr", video_ids=video_ids, splits=splits,
                                labels=labels, classes=CLASSES, shape=SHAPE, aug_views=2)
    for row in range(3):
        cache.write_row(row, row_values(row), aug=np.stack([row_values(10 + row),
                                                            row_values(20 + row)]))
    got = cache.read_rows([2, 0], views=[1, 0], check_done=False)
    expected = np.stack([row_values(22), row_values(10)]).astype(np.float16)
    np.testing.assert_array_equal(got, expected)
