"""`cli.py extract` end to end: rows equal a direct backbone call on the sampled frames, labels,
splits and ids, error reports, resume after a killed run, two-rank sharding, refusals."""

import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from extract_testing import SMALL, SPLIT_LINES, build_dataset, decode_all, random_resnet18
from torchvision.transforms.v2 import functional as tvf

from cache import FeatureCache, UserError
from cli import cli
from extract import pipeline
from extract.decode import DecodedVideo
from extract.output import read_errors
from extract.plan import ExtractConfig, RunPlan
from extract.producer import END, Batcher
from extract.sampling import ViewPlan, plan_views

REPO = Path(__file__).resolve().parents[2]
EXPECTED_IDS = [v for s in ("train", "val", "test") for v in SPLIT_LINES[s] if v != "swim/gone"]


def extract_args(root, split_dir, out, weights, *extra):
    return ["extract", "--dataset", "custom", "--root", str(root), "--split-dir", str(split_dir),
            "--out", str(out), "--weights", str(weights), "--device", "cpu", "--workers", "1",
            *SMALL, *extra]


def run_cli(args, cwd):
    """Run the command in this process (from ``cwd``, where caches/latest.json goes)."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, args, catch_exceptions=False)
    finally:
        os.chdir(old)


def cli_process(args, cwd, **env):
    """The command as its own process (one torch thread: the test machine's cores are shared)."""
    return subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def video_path(root, video_id):
    target = root / video_id
    if target.is_dir():
        return str(target)
    return str(next(p for p in target.parent.iterdir() if p.stem == target.name))


def reference_maps(path, plans, trunk, resize=72, size=64):
    """The test's own pipeline: decode all frames, pick, resize, crop, normalise, run the trunk."""
    frames = decode_all(path)
    out = []
    for plan in plans:
        x = torch.from_numpy(frames[list(plan.indices)]).permute(0, 3, 1, 2)
        x = tvf.resize(x, [resize, resize], antialias=True)
        x = x[:, :, plan.top:plan.top + size, plan.left:plan.left + size]
        x = x.flip(-1) if plan.flip else x
        x = tvf.normalize(x.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        with torch.no_grad():
            out.append(trunk(x).permute(1, 0, 2, 3).numpy())  # (C, T, h, w)
    return out


def centre_plan(n, frames=8):
    """The cached view, written out from the issue: frame floor((t + 0.5) * n / T) of each
    segment, the centre 64 crop of a 72 resize (offset 4), no flip."""
    return [ViewPlan(tuple(math.floor((t + 0.5) * n / frames) for t in range(frames)), 4, 4,
                     False)]


@pytest.fixture(scope="module")
def trunk():
    net = random_resnet18()  # what weights_file holds
    return torch.nn.Sequential(*list(net.children())[:-2]).eval()


def assert_close_fp16(actual, expected):
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual.astype(np.float32), expected, rtol=5e-3, atol=5e-3 * scale)


@pytest.fixture(scope="module")
def extracted(dataset, weights_file, tmp_path_factory):
    """One single-process extraction of the generated dataset, shared by several tests."""
    root, split_dir = dataset
    work = tmp_path_factory.mktemp("single")
    result = run_cli(extract_args(root, split_dir, work / "feats.zarr", weights_file), work)
    return work, work / "feats.zarr", result


@pytest.mark.slow
def test_rows_equal_the_backbone_on_the_sampled_frames(extracted, dataset, trunk):
    work, out, result = extracted
    root, _ = dataset
    assert result.exit_code == 0, result.output
    with FeatureCache.open(out) as cache:
        assert list(cache.video_ids) == EXPECTED_IDS
        assert cache.shape == (512, 8, 2, 2) and cache.attrs["dtype"] == "float16"
        for row, video_id in enumerate(EXPECTED_IDS):
            if video_id == "swim/v1":
                assert not cache.done[row]
                continue
            path = video_path(root, video_id)
            (expected,) = reference_maps(path, centre_plan(len(decode_all(path))), trunk)
            assert_close_fp16(cache.read_row(row), expected)


@pytest.mark.slow
def test_labels_splits_ids_and_attributes(extracted, weights_file):
    work, out, _ = extracted
    with FeatureCache.open(out) as cache:
        assert cache.classes == ["jump", "run", "swim", "walk"]
        assert [cache.classes[label] for label in cache.labels] == \
            [v.split("/")[0] for v in EXPECTED_IDS]
        assert list(cache.splits) == ["train"] * 4 + ["val"] * 2 + ["test"] * 2
        attrs = cache.attrs
    assert attrs["backbone"] == "resnet18" and attrs["frames"] == 8
    assert attrs["image_size"] == 64 and attrs["resize"] == 72
    assert attrs["sampling"] == "tsn-centre" and attrs["dataset"] == "custom"
    assert attrs["mean"] == [0.485, 0.456, 0.406] and attrs["std"] == [0.229, 0.224, 0.225]
    assert attrs["weights"]["format"] == "state dict"
    assert attrs["weights"]["sha256"] == __import__("hashlib").sha256(
        Path(weights_file).read_bytes()).hexdigest()
    assert attrs["created"] and attrs["code_version"]
    assert attrs["augmentation"]["views"] == 0
    assert json.loads((work / "caches" / "latest.json").read_text()) == {
        "path": str(out), "dataset": "custom"}


@pytest.mark.slow
def test_corrupt_and_missing_videos_are_reported_and_skipped(extracted):
    _, out, result = extracted
    assert "extracted 7 videos" in result.output
    assert "1 failed, 1 missing on disk; cache 7/8 rows done" in result.output
    assert "failed  swim/v1: decord:" in result.output and "missing swim/gone" in result.output
    with FeatureCache.open(out) as cache:
        report = read_errors(cache)
        assert cache.attrs["errors"]["missing"] == ["swim/gone"]
    assert report["missing"] == ["swim/gone"]
    assert [f["video"] for f in report["failed"]] == ["swim/v1"]
    assert "pyav:" in report["failed"][0]["reason"]


@pytest.mark.slow
def test_rerun_resumes_and_other_settings_are_refused(extracted, dataset, weights_file, tmp_path):
    work, out, _ = extracted
    root, split_dir = dataset
    copy = tmp_path / "copy.zarr"
    shutil.copytree(out, copy)
    again = run_cli(extract_args(root, split_dir, copy, weights_file), tmp_path)
    assert again.exit_code == 0 and "extracted 0 videos" in again.output
    assert "7 already done, 1 failed" in again.output
    changed = run_cli(extract_args(root, split_dir, copy, weights_file, "--image-size", "32"),
                      tmp_path)
    assert changed.exit_code == 1
    assert "image_size: cache 64, this run 32" in changed.output and "--overwrite" in changed.output
    other = run_cli(extract_args(root, split_dir, copy, "none", "--limit", "1"), tmp_path)
    assert other.exit_code == 1 and "weights_state_sha256" in other.output
    assert "selection" in other.output
    replaced = run_cli(extract_args(root, split_dir, copy, weights_file, "--image-size", "32",
                                    "--splits", "test", "--overwrite"), tmp_path)
    assert replaced.exit_code == 0, replaced.output
    with FeatureCache.open(copy) as cache:
        assert cache.shape == (512, 8, 1, 1) and list(cache.video_ids) == ["walk/v0", "walk/v1"]
        assert cache.done.all()


@pytest.mark.slow
def test_augmented_views_are_seeded_crops_of_random_segment_frames(dataset, weights_file,
                                                                   tmp_path, trunk):
    root, split_dir = dataset
    args = ["--aug-views", "2", "--seed", "5", "--splits", "train", "--limit", "2"]
    first = run_cli(extract_args(root, split_dir, tmp_path / "a.zarr", weights_file, *args),
                    tmp_path)
    assert first.exit_code == 0, first.output
    with FeatureCache.open(tmp_path / "a.zarr") as cache:
        assert cache.aug_views == 2 and cache.attrs["augmentation"]["flip"] is True
        for row, video_id in enumerate(["jump/v0", "jump/v1"]):
            path = video_path(root, video_id)
            plans = plan_views(len(decode_all(path)), frames=8, video_id=video_id, aug_views=2,
                               seed=5, resize=72, image_size=64)
            expected = reference_maps(path, plans, trunk)
            assert_close_fp16(cache.read_row(row), expected[0])
            for view in (0, 1):
                assert_close_fp16(cache.read_row(row, view=view), expected[1 + view])


def _fifo_dataset(base: Path) -> tuple[Path, Path, Path, Path]:
    """Five train videos; the third is a frame folder whose sampled frame img_7.png is a FIFO,
    so reading it blocks forever (like decord on a broken file) until someone writes to it."""
    videos = {"a/v0": ("mp4", 24), "a/v1": ("webm", 30), "a/v2": ("frames", 12),
              "b/v0": ("mp4", 28), "b/v1": ("frames", 20)}
    build_dataset(base / "root", base / "splits", videos, {"train": sorted(videos)})
    fifo = base / "root" / "a" / "v2" / "img_7.png"  # frame 6: sampled for T = 8 (and T = 1)
    saved = base / "img_7.png"
    shutil.move(fifo, saved)
    os.mkfifo(fifo)
    return base / "root", base / "splits", fifo, saved


def _release(fifo: Path) -> None:
    """Let a reader blocked on the FIFO go (it then fails to read an image)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader left


@pytest.mark.slow
def test_a_named_pipe_frame_fails_at_once_and_the_run_goes_on(tmp_path, weights_file):
    """A FIFO in place of a frame used to block its decode worker until the --timeout; it is
    now refused before a decoder opens it (issue 24 item 17: in-process decoding has no timeout).
    The timeout of a decoder that really hangs: test_extract_decode's hanging-decord test."""
    root, split_dir, fifo, _ = _fifo_dataset(tmp_path)
    result = run_cli(extract_args(root, split_dir, tmp_path / "c.zarr", weights_file,
                                  "--timeout", "2"), tmp_path)
    _release(fifo)
    assert result.exit_code == 0, result.output
    assert "failed  a/v2" in result.output and "is not a regular file" in result.output
    with FeatureCache.open(tmp_path / "c.zarr") as cache:
        assert cache.done.tolist() == [True, True, False, True, True]


@pytest.mark.slow
def test_resume_after_a_killed_run(tmp_path, weights_file, trunk):
    root, split_dir, fifo, saved = _fifo_dataset(tmp_path)
    out = tmp_path / "r.zarr"
    args = extract_args(root, split_dir, out, weights_file, "--workers", "0")
    process = cli_process(args, tmp_path)  # decodes in-process: the FIFO blocks the run itself
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            with FeatureCache.open(out) as cache:
                if cache.done[:2].all():
                    break
        except Exception:  # not created yet
            continue
    # Killed at once (a named pipe no longer blocks in-process decoding, issue 24: it fails as
    # "not a regular file", so a/v2 is never done in this run); the flags are read after the kill.
    process.send_signal(signal.SIGKILL)
    process.wait()
    _release(fifo)
    with FeatureCache.open(out) as cache:
        done = cache.done
    assert done[:2].all() and not done[2], process.stdout.read()
    os.remove(fifo)
    shutil.copy(saved, fifo)
    resumed = run_cli(args, tmp_path)
    assert resumed.exit_code == 0, resumed.output
    n = int(done.sum())
    assert f"extracted {5 - n} videos" in resumed.output
    assert f"{n} already done, 0 failed" in resumed.output
    with FeatureCache.open(out) as cache:
        assert cache.done.all()
        for row, video_id in enumerate(["a/v0", "a/v1", "a/v2", "b/v0", "b/v1"]):
            path = video_path(root, video_id)
            (expected,) = reference_maps(path, centre_plan(len(decode_all(path))), trunk)
            assert_close_fp16(cache.read_row(row), expected)


@pytest.mark.slow
def test_two_ranks_give_the_same_cache_as_one_process(extracted, dataset, weights_file, tmp_path):
    _, single, _ = extracted
    root, split_dir = dataset
    out = tmp_path / "sharded.zarr"
    args = extract_args(root, split_dir, out, weights_file, "--workers", "0")
    ranks = [cli_process(args, tmp_path, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r))
             for r in (1, 0)]
    outputs = [p.communicate(timeout=240)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs
    assert "rank 1/2: extracted 3 videos" in outputs[0]  # rows 1, 3, 7 (row 5 is corrupt)
    assert "rank 0/2: extracted 4 videos" in outputs[1]
    with FeatureCache.open(out) as two, FeatureCache.open(single) as one:
        assert list(two.video_ids) == list(one.video_ids)
        assert list(two.labels) == list(one.labels) and list(two.splits) == list(one.splits)
        assert two.classes == one.classes
        np.testing.assert_array_equal(two.done, one.done)
        for row in one.rows():
            assert_close_fp16(two.read_row(row), one.read_row(row).astype(np.float32))
        assert read_errors(two)["missing"] == read_errors(one)["missing"]
        assert [f["video"] for f in read_errors(two)["failed"]] == ["swim/v1"]
        assert "errors_rank1" in two.attrs and two.attrs["errors_rank0"]["failed"] == []


@pytest.mark.slow
def test_several_writer_threads_write_the_same_cache_as_one(extracted, dataset, weights_file,
                                                           tmp_path):
    """--writers 3: rows written by three threads in any order equal the one-writer cache, bit
    for bit (same backbone outputs, same fp16 rows), with every done flag and error report."""
    _, single, _ = extracted
    root, split_dir = dataset
    out = tmp_path / "threads.zarr"
    result = run_cli(extract_args(root, split_dir, out, weights_file, "--writers", "3"), tmp_path)
    assert result.exit_code == 0, result.output
    with FeatureCache.open(out) as three, FeatureCache.open(single) as one:
        assert list(three.video_ids) == list(one.video_ids)
        np.testing.assert_array_equal(three.done, one.done)
        for row in one.rows():
            np.testing.assert_array_equal(three.read_row(row), one.read_row(row))
        assert [f["video"] for f in read_errors(three)["failed"]] == ["swim/v1"]


def test_writer_threads_default_by_device_and_backend():
    plan = RunPlan.make(ExtractConfig(dataset="custom", root="x"), torch.device("cuda"))
    assert plan.writers == 4
    assert RunPlan.make(ExtractConfig(dataset="custom", root="x"), torch.device("cpu")).writers == 1
    hdf5 = ExtractConfig(dataset="custom", root="x", backend="hdf5", writers=8)
    assert RunPlan.make(hdf5, torch.device("cuda")).writers == 1  # one HDF5 writer, always
    assert RunPlan.make(ExtractConfig(dataset="custom", root="x", writers=2),
                        torch.device("cpu")).writers == 2
    with pytest.raises(UserError, match="--writers must be at least 1"):
        ExtractConfig(dataset="custom", root="x", writers=0)


def _feed(partial: bool, videos: int = 10) -> list[int]:
    """Batch sizes of the main loop fed videos of 8 frames that arrive every 10 ms."""
    producer = SimpleNamespace(out=queue.Queue(), error=None)
    writer = SimpleNamespace(inbox=queue.Queue(), error=None)

    def arrive():
        for row in range(videos):
            time.sleep(0.01)
            producer.out.put(DecodedVideo(row, f"a/v{row}", np.zeros((1, 8, 3, 2, 2), np.uint8),
                                          8, "decord"))
        producer.out.put(END)

    sizes = []

    def extractor(crops):
        sizes.append(len(crops))
        return torch.zeros(len(crops), 4, 1, 1)

    thread = threading.Thread(target=arrive)
    thread.start()
    summary = SimpleNamespace(failed=[], fallbacks=[])
    pipeline._feed_backbone(producer, writer, extractor, Batcher(32), 8, summary,
                            SimpleNamespace(update=lambda n: None), partial)
    thread.join()
    assert writer.inbox.qsize() == videos  # every video's row reaches the writer
    return sizes


def test_a_cpu_backbone_waits_for_full_batches_a_gpu_runs_what_is_decoded():
    assert _feed(partial=False) == [32, 32, 16]
    assert min(_feed(partial=True)) < 32 and sum(_feed(partial=True)) == 80
    assert not RunPlan.make(ExtractConfig(dataset="custom", root="x"),
                            torch.device("cpu")).partial_batches
    assert RunPlan.make(ExtractConfig(dataset="custom", root="x"),
                        torch.device("cuda")).partial_batches


@pytest.mark.slow
def test_hdf5_backend_works_for_one_process_and_refuses_several(dataset, weights_file,
                                                                 tmp_path, monkeypatch):
    root, split_dir = dataset
    args = extract_args(root, split_dir, tmp_path / "f.h5", weights_file, "--backend", "hdf5",
                        "--splits", "test")
    result = run_cli(args, tmp_path)
    assert result.exit_code == 0, result.output
    with FeatureCache.open(tmp_path / "f.h5") as cache:
        assert cache.backend == "hdf5" and cache.done.all() and len(cache) == 2
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused = run_cli(args, tmp_path)
    assert refused.exit_code == 1 and "hdf5 backend takes one writer" in refused.output


@pytest.mark.slow
def test_nothing_found_or_nothing_decodable_is_an_error(dataset, weights_file, tmp_path):
    _, split_dir = dataset
    (tmp_path / "empty").mkdir()
    result = run_cli(extract_args(tmp_path / "empty", split_dir, tmp_path / "e.zarr",
                                  weights_file), tmp_path)
    assert result.exit_code == 1 and "no video of the train/val/test split lists" in result.output
    root = tmp_path / "broken"
    (root / "x").mkdir(parents=True)
    (root / "x" / "v.mp4").write_bytes(b"\x00" * 100)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "trainlist.txt").write_text("x/v\n")
    bad = run_cli(extract_args(root, tmp_path / "lists", tmp_path / "b.zarr", weights_file),
                  tmp_path)
    assert bad.exit_code == 1 and "no video could be extracted" in bad.output


@pytest.mark.slow
def test_rows_hold_the_frames_of_the_sampling_rule_not_their_neighbours(extracted, dataset,
                                                                         trunk):
    _, out, _ = extracted
    root, _ = dataset
    path = video_path(root, "walk/v1")  # 36 frames
    centre = centre_plan(len(decode_all(path)))[0]
    assert list(centre.indices) == [math.floor((t + 0.5) * 36 / 8) for t in range(8)]
    (shifted,) = reference_maps(path, [ViewPlan(tuple(i + 1 for i in centre.indices), 4, 4,
                                                False)], trunk)
    with FeatureCache.open(out) as cache:
        row = cache.read_row(EXPECTED_IDS.index("walk/v1")).astype(np.float32)
    assert np.abs(row - shifted).max() > 0.05 * np.abs(shifted).max()


@pytest.mark.slow
def test_ssv2_videos_by_id_with_split_prefixed_classes_and_no_flip(dataset, weights_file,
                                                                   tmp_path, trunk):
    root, _ = dataset
    lines = (REPO / "extract" / "splits" / "ssv2_OTAM" / "trainlist03.txt").read_text().split()
    ssv2 = tmp_path / "ssv2"
    ssv2.mkdir()
    shutil.copy(video_path(root, "jump/v1"), ssv2 / f"{lines[1].split('/')[1]}.webm")
    args = ["extract", "--dataset", "ssv2", "--root", str(ssv2), "--out", str(tmp_path / "s.zarr"),
            "--weights", str(weights_file), "--device", "cpu", "--workers", "0", "--splits",
            "train", "--aug-views", "4", *SMALL]
    result = run_cli(args, tmp_path)
    assert result.exit_code == 0, result.output
    assert f"{len(lines) - 1} listed videos are missing" in result.output
    with FeatureCache.open(tmp_path / "s.zarr") as cache:
        assert list(cache.video_ids) == [lines[1]]
        assert cache.classes[cache.labels[0]] == lines[1].split("/")[0]  # e.g. "train50"
        assert cache.attrs["augmentation"]["flip"] is False
        path = str(ssv2 / f"{lines[1].split('/')[1]}.webm")
        plans = plan_views(len(decode_all(path)), frames=8, video_id=lines[1], aug_views=4,
                           resize=72, image_size=64, flip=False)
        expected = reference_maps(path, plans, trunk)
        for view in range(4):
            assert_close_fp16(cache.read_row(0, view=view), expected[1 + view])


@pytest.mark.slow
def test_int8_rows_with_another_codec_read_as_the_float16_rows_and_resume(extracted, dataset,
                                                                         weights_file, tmp_path):
    """--store-dtype int8 --codec lz4: every row reads back (as float16) within half a
    quantisation step per video and channel of the float16 cache's row; a rerun resumes only
    the rows not done, with the same bytes; another store dtype is refused on resume."""
    _, single, _ = extracted
    root, split_dir = dataset
    out = tmp_path / "int8.zarr"
    args = extract_args(root, split_dir, out, weights_file, "--store-dtype", "int8", "--codec",
                        "lz4")
    result = run_cli(args, tmp_path)
    assert result.exit_code == 0, result.output
    with FeatureCache.open(out) as small, FeatureCache.open(single) as one:
        assert small.store_dtype == "int8" and small.attrs["codec"] == "lz4"
        np.testing.assert_array_equal(small.done, one.done)
        for row in one.rows():
            x = one.read_row(row).astype(np.float32)  # (C, T, h, w)
            got = small.read_row(row)
            assert got.dtype == np.float16
            step = (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)))[:, None, None, None] / 254
            assert (np.abs(got.astype(np.float32) - x) <= step / 2 + 2 ** -11 * x + 1e-6).all()
        before = small.read_rows(one.rows())
    with FeatureCache.open(out, mode="r+") as cache:
        cache.mark_not_done([0, 3])  # as a run killed before these rows were done
    again = run_cli(args, tmp_path)
    assert again.exit_code == 0 and "extracted 2 videos" in again.output, again.output
    with FeatureCache.open(out) as cache:
        np.testing.assert_array_equal(cache.read_rows(cache.rows()), before)
    other = run_cli(extract_args(root, split_dir, out, weights_file, "--store-dtype", "bfloat16"),
                    tmp_path)
    assert other.exit_code == 1 and "store_dtype: cache 'int8', this run 'bfloat16'" in \
        other.output
