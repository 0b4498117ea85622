"""Issue 10, security (cache part): `overwrite` deletes only a cache of this tool, and never
touches an HDF5 file another process is writing."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from cache_testing import CLASSES, SHAPE, make_rows, row_values
from click.testing import CliRunner

import cli
from cache import FeatureCache, UserError
from cache.errors import CacheInUse, NotACache

WRITER = str(Path(__file__).with_name("writer_process.py"))


def digest(path: Path) -> str:
    """Names and bytes of everything under ``path`` (or of the file)."""
    h = hashlib.sha256()
    for p in [path] if path.is_file() else sorted(path.rglob("*")):
        h.update(str(p).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def create(path, backend=None, n=3, overwrite=False):
    video_ids, splits, labels = make_rows(n)
    return FeatureCache.create(path, video_ids=video_ids, splits=splits, labels=labels,
                               classes=CLASSES, shape=SHAPE, backend=backend,
                               overwrite=overwrite)


def a_dataset_folder(path: Path) -> None:
    (path / "videos" / "jump").mkdir(parents=True)
    (path / "videos" / "jump" / "v0.mp4").write_bytes(b"not really a video")
    (path / "notes.txt").write_text("a week of work")


def a_foreign_zarr_group(path: Path) -> None:
    group = zarr.open_group(path, mode="w-", attributes={"project": "someone else's"})
    group.create_array("data", shape=(4,), dtype="float32")[:] = 1


def a_plain_file(path: Path) -> None:
    path.write_text("my thesis")


def an_hdf5_file_of_another_program(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(5)


@pytest.mark.parametrize("make, name, backend, reason", [
    (a_dataset_folder, "data", "zarr", "a folder without zarr.json"),
    (a_foreign_zarr_group, "other.zarr", "zarr", "without the schema_version attribute"),
    (a_plain_file, "thesis.txt", "zarr", "a file, not a Zarr folder"),
    (a_plain_file, "thesis.h5", "hdf5", "not a readable HDF5 file"),
    (an_hdf5_file_of_another_program, "theirs.h5", "hdf5", "without the schema_version"),
    (lambda p: p.mkdir(), "folder.h5", "hdf5", "a folder, not an HDF5 file"),
])
def test_overwrite_refuses_anything_that_is_not_a_cache(tmp_path, make, name, backend, reason):
    target = tmp_path / name
    make(target)
    before = digest(target)
    with pytest.raises(NotACache, match=reason) as refused:
        create(target, backend=backend, overwrite=True)
    assert "never replaced" in refused.value.message
    # the refusal never suggests the flag (the test's own path is named after the test)
    assert "overwrite" not in refused.value.message.replace(str(target), "")
    assert digest(target) == before


def test_synth_overwrite_on_a_home_like_folder_is_one_line_and_deletes_nothing(tmp_path):
    home = tmp_path / "home"
    a_dataset_folder(home)
    before = digest(home)
    result = CliRunner().invoke(cli.cli, ["synth", "--out", str(home), "--overwrite",
                                          "--train-classes", "1", "--val-classes", "0",
                                          "--test-classes", "0", "--videos-per-class", "1"])
    assert result.exit_code == 1
    assert "is not a feature cache" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert digest(home) == before


def test_overwrite_replaces_a_cache_and_an_empty_folder(tmp_path, backend):
    path = tmp_path / ("c.h5" if backend == "hdf5" else "c.zarr")
    with create(path, backend, n=3) as old:
        old.write_row(0, row_values(0))
    with pytest.raises(UserError, match="already exists; open it, or pass overwrite"):
        create(path, backend, n=6)
    with create(path, backend, n=6, overwrite=True) as new:
        assert len(new) == 6 and not new.done.any()
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    create(empty).close()
    assert len(FeatureCache.open(empty)) == 3


def test_a_cache_folder_holding_other_files_is_not_replaced(tmp_path):
    path = tmp_path / "c.zarr"
    with create(path) as cache:
        cache.write_row(1, row_values(1))
    (path / "my_notes.txt").write_text("keep me")
    before = digest(path)
    with pytest.raises(NotACache, match="my_notes.txt, which no cache holds"):
        create(path, overwrite=True)
    assert digest(path) == before
    np.testing.assert_array_equal(FeatureCache.open(path).read_row(1),
                                  row_values(1).astype(np.float16))


def test_overwrite_deletes_only_the_cache_entries(tmp_path):
    parent = tmp_path / "caches"
    parent.mkdir()
    (parent / "latest.json").write_text("{}")
    path = parent / "c.zarr"
    create(path).close()
    create(path, overwrite=True).close()
    assert sorted(os.listdir(parent)) == ["c.zarr", "latest.json"]
    assert sorted(os.listdir(path)) == ["done", "features", "label", "split", "video_id",
                                        "zarr.json"]


def test_hdf5_overwrite_is_refused_while_another_process_writes_and_both_survive(tmp_path):
    path = str(tmp_path / "busy.h5")
    create(path, "hdf5", n=12).close()
    writer = subprocess.Popen([sys.executable, WRITER, path, "0", "12", "0.1"],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "0"  # it holds the file and is writing
    with pytest.raises(CacheInUse, match="in use by another process") as refused:
        create(path, "hdf5", n=3, overwrite=True)
    assert "overwrite" not in refused.value.message.replace(path, "")
    assert writer.wait(timeout=60) == 0
    with FeatureCache.open(path) as cache:  # the writer's file was never truncated
        assert len(cache) == 12 and cache.done.all()
        for row in range(12):
            np.testing.assert_array_equal(cache.read_row(row), row_values(row).astype(np.float16))
