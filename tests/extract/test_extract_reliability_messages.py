"""Issue 10, one line instead of a traceback (extract part): symbolic-link loops, unwritable
--out, lines leaving --root, an interrupted creation that must resume, two extracts on one
--out."""

import os

import pytest
import zarr
from extract_testing import build_dataset
from reliability_helpers import extract, one_line

from cache import FeatureCache, UserError
from cache.paths import writer_lock
from extract.datasets import find_videos, read_split_lines


def test_symlink_loops_are_reported_per_video_and_the_run_goes_on(weights_file, tmp_path):
    root = tmp_path / "root"
    build_dataset(root, tmp_path / "lists",
                  {"jump/v0": ("frames", 6), "run/v0": ("frames", 6)},
                  {"train": ["jump/v0", "jump/v2", "jump/v3"], "test": ["run/v0", "loop/v0"]})
    os.symlink("v2", root / "jump" / "v2")  # a frame folder that is a link to itself
    os.symlink("v3.mp4", root / "jump" / "v3.mp4")
    os.symlink("loop", root / "loop")  # a whole class folder
    found = find_videos("custom", root, split_dir=tmp_path / "lists")
    assert [r.video_id for r in found.records] == ["jump/v0", "jump/v2", "jump/v3", "run/v0"]
    assert found.missing == ["loop/v0"]
    assert any("cannot list" in w and "symbolic links" in w for w in found.warnings)
    result = extract(root, tmp_path / "lists", tmp_path / "l.zarr", weights_file, tmp_path)
    assert result.exit_code == 0, result.output
    assert "failed  jump/v2:" in result.output and "failed  jump/v3:" in result.output
    assert "Too many levels of symbolic links" in result.output
    with FeatureCache.open(tmp_path / "l.zarr") as cache:
        assert cache.done.tolist() == [True, False, False, True]


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_an_unwritable_out_is_refused_before_any_work(tmp_path, weights_file, backend):
    (tmp_path / "plain").write_text("x")
    missing_root = tmp_path / "no-dataset-here"  # would fail later: --out is checked first
    name = "c.h5" if backend == "hdf5" else "c.zarr"
    for out, message in [(tmp_path / "plain" / name, "plain is a file, not a folder"),
                         (f"/proc/{name}", "/proc is not writable")]:
        result = extract(missing_root, tmp_path, out, weights_file, tmp_path,
                         "--backend", backend)
        assert message in one_line(result)
    assert sorted(os.listdir(tmp_path)) == ["plain"]


def test_split_lines_that_leave_the_root_are_refused(tmp_path, tiny_dataset, weights_file):
    lists = tmp_path / "lists"
    lists.mkdir()
    for line in ["../secret/v0", "jump/../../v0", "/etc/passwd", "jump/./v0"]:
        (lists / "trainlist.txt").write_text(f"jump/v0\n{line}\n")
        with pytest.raises(UserError, match=r"trainlist.txt:2: .* leaves the dataset folder"):
            read_split_lines(lists / "trainlist.txt")
    root, _ = tiny_dataset
    result = extract(root, lists, tmp_path / "x.zarr", weights_file, tmp_path)
    assert "leaves the dataset folder" in one_line(result)


def test_a_zarr_store_whose_creation_was_killed_resumes_without_overwrite(tiny_dataset,
                                                                          weights_file,
                                                                          tmp_path, monkeypatch):
    root, split_dir = tiny_dataset
    out = tmp_path / "k.zarr"

    def killed(*args, **kwargs):  # kill -9 just after the group's metadata was written
        raise KeyboardInterrupt

    monkeypatch.setattr(zarr.Group, "create_array", killed)
    interrupted = extract(root, split_dir, out, weights_file, tmp_path)
    monkeypatch.undo()
    assert interrupted.exit_code != 0 and (out / "zarr.json").exists()
    assert not (out / "features").exists()
    resumed = extract(root, split_dir, out, weights_file, tmp_path)
    assert resumed.exit_code == 0, resumed.output
    with FeatureCache.open(out) as cache:
        assert cache.done.tolist() == [True, True, True, False]


def test_a_cache_killed_before_it_was_ready_resumes_on_hdf5(tiny_dataset, weights_file, tmp_path,
                                                           monkeypatch):
    root, split_dir = tiny_dataset
    out = tmp_path / "k.h5"
    real = FeatureCache.update_attrs

    def killed(self, **values):
        if "extract_ready" in values:
            raise KeyboardInterrupt  # created and renamed into place, never marked ready
        real(self, **values)

    monkeypatch.setattr(FeatureCache, "update_attrs", killed)
    extract(root, split_dir, out, weights_file, tmp_path, "--backend", "hdf5")
    monkeypatch.undo()
    assert out.exists()
    resumed = extract(root, split_dir, out, weights_file, tmp_path, "--backend", "hdf5")
    assert resumed.exit_code == 0, resumed.output
    with FeatureCache.open(out) as cache:
        assert cache.attrs["extract_ready"] and cache.done.sum() == 3


def test_a_second_extract_on_the_same_out_is_refused_and_wipes_nothing(tiny_dataset,
                                                                       weights_file, tmp_path):
    root, split_dir = tiny_dataset
    out = tmp_path / "shared.zarr"
    assert extract(root, split_dir, out, weights_file, tmp_path).exit_code == 0
    before = FeatureCache.open(out).read_rows([0, 1, 2])
    with writer_lock(out):  # the first extract, still running (a separate open file: flock)
        for extra in ([], ["--overwrite"]):
            result = extract(root, split_dir, out, weights_file, tmp_path, *extra)
            assert "is being written by another process" in one_line(result)
    with FeatureCache.open(out) as cache:
        assert cache.done.sum() == 3 and (cache.read_rows([0, 1, 2]) == before).all()
