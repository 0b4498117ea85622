"""Issue 10, silent wrong results (extract part): rerunning extract repairs done rows that are
missing or damaged (a deleted chunk, a forged done flag; with --verify also a corrupted chunk),
and duplicate split-list lines never become two rows of one video."""

import os

import numpy as np
import pytest
from click.testing import CliRunner
from extract_testing import build_dataset
from reliability_helpers import copy_of, extract, one_line

import cli
from cache import FeatureCache, UserError
from extract.datasets import find_videos

CORRUPT_ROW = 3  # run/v1: no decoder can read it, so it is never done


@pytest.fixture(scope="module")
def extracted(tiny_dataset, weights_file, tmp_path_factory):
    root, split_dir = tiny_dataset
    work = tmp_path_factory.mktemp("extracted")
    result = extract(root, split_dir, work / "tiny.zarr", weights_file, work)
    assert result.exit_code == 0, result.output
    with FeatureCache.open(work / "tiny.zarr") as cache:
        assert cache.done.tolist() == [True, True, True, False]
        rows = cache.read_rows([0, 1, 2])
    return work / "tiny.zarr", rows


def chunk(cache, row):
    return cache / "features" / "c" / str(row) / "0" / "0" / "0" / "0"


def test_rerun_repairs_a_deleted_row_and_clears_a_forged_done_flag(extracted, tiny_dataset,
                                                                   weights_file, tmp_path):
    cache_path, rows = extracted
    out = copy_of(cache_path, tmp_path)
    os.remove(chunk(out, 0))
    with FeatureCache.open(out, mode="r+") as cache:
        cache._backend.write("done", CORRUPT_ROW, True)  # a stale flag for the failed video
    root, split_dir = tiny_dataset
    result = extract(root, split_dir, out, weights_file, tmp_path)
    assert result.exit_code == 0, result.output
    assert "2 done rows are missing or damaged" in result.output
    assert "extracted 1 videos" in result.output and "2 already done, 1 failed" in result.output
    with FeatureCache.open(out) as cache:
        assert cache.done.tolist() == [True, True, True, False]  # the forged flag is gone
        np.testing.assert_array_equal(cache.read_rows([0, 1, 2]), rows)  # row 0 as before
        assert cache.verify() == []


def test_verify_finds_and_repairs_a_corrupted_chunk_the_listing_cannot_see(extracted,
                                                                         tiny_dataset,
                                                                         weights_file, tmp_path):
    cache_path, rows = extracted
    out = copy_of(cache_path, tmp_path)
    data = bytearray(chunk(out, 2).read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk(out, 2).write_bytes(bytes(data))
    root, split_dir = tiny_dataset
    plain = extract(root, split_dir, out, weights_file, tmp_path)
    assert "missing or damaged" not in plain.output  # the chunk is there: only reading tells
    with FeatureCache.open(out) as cache, pytest.raises(UserError, match="row 2 .* damaged"):
        cache.read_row(2)
    assert CliRunner().invoke(cli.cli, ["info", str(out), "--verify"]).exit_code == 1
    verified = extract(root, split_dir, out, weights_file, tmp_path, "--verify")
    assert verified.exit_code == 0, verified.output
    assert "1 done rows are missing or damaged (e.g. run/v0: damaged (checksum mismatch))" \
        in verified.output
    assert "1 done rows were missing or damaged and were extracted again" in verified.output
    with FeatureCache.open(out) as cache:
        np.testing.assert_array_equal(cache.read_rows([0, 1, 2]), rows)
    assert CliRunner().invoke(cli.cli, ["info", str(out), "--verify"]).exit_code == 0


def lists(folder, **split_lines):
    folder.mkdir()
    for split, lines in split_lines.items():
        (folder / f"{split}list.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_duplicate_lines_within_a_split_are_kept_once_with_a_warning(tiny_dataset, weights_file,
                                                                     tmp_path):
    root, _ = tiny_dataset
    split_dir = lists(tmp_path / "lists", train=["jump/v0", "jump/v1", "jump/v0", "jump/v0"],
                      test=["run/v0"])
    found = find_videos("custom", root, split_dir=split_dir)
    assert [r.video_id for r in found.records] == ["jump/v0", "jump/v1", "run/v0"]
    assert len(found.warnings) == 1 and "2 repeated lines kept once (e.g. jump/v0)" \
        in found.warnings[0]
    result = extract(root, split_dir, tmp_path / "d.zarr", weights_file, tmp_path)
    assert result.exit_code == 0 and "warning: " in result.output
    with FeatureCache.open(tmp_path / "d.zarr") as cache:
        assert list(cache.video_ids) == ["jump/v0", "jump/v1", "run/v0"]


def test_a_video_in_two_splits_is_refused(tiny_dataset, weights_file, tmp_path):
    root, _ = tiny_dataset
    split_dir = lists(tmp_path / "lists", train=["jump/v0", "jump/v1"], test=["run/v0", "jump/v1"])
    with pytest.raises(UserError, match="jump/v1 is listed in both the train and the test"):
        find_videos("custom", root, split_dir=split_dir)
    result = extract(root, split_dir, tmp_path / "d.zarr", weights_file, tmp_path,
                     "--splits", "test")  # even when only one of the splits is extracted
    assert "belongs to one split only" in one_line(result)


def test_two_lines_that_find_the_same_file_are_one_video(tmp_path):
    build_dataset(tmp_path / "k", tmp_path / "unused", {"blasting sand/v0": ("frames", 3)},
                  {"train": []})
    split_dir = lists(tmp_path / "lists", train=["blasting sand/v0", "blasting_sand/v0"])
    found = find_videos("kinetics", tmp_path / "k", split_dir=split_dir)
    assert [r.video_id for r in found.records] == ["blasting sand/v0"]
    assert "are the same video" in found.warnings[0]
    split_dir = lists(tmp_path / "across", train=["blasting sand/v0"], val=["blasting_sand/v0"])
    with pytest.raises(UserError, match="are the same video .* one split only"):
        find_videos("kinetics", tmp_path / "k", split_dir=split_dir)
