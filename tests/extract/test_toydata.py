"""The built-in demo dataset: layout `extract --dataset custom` reads, determinism, real motion."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from extract.datasets import find_videos
from extract.toydata import (
    DIRECTIONS,
    ToyConfig,
    class_name,
    direction_vector,
    make_toy_dataset,
    render_video,
)

SMALL = dict(train_classes=3, val_classes=2, test_classes=2, videos_per_class=2, frames=12,
             size=48)


def decode(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def file_hashes(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.mp4"))}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), ToyConfig(**SMALL), progress=False)


def test_custom_layout_that_extract_finds(toy):
    found = find_videos("custom", toy.root, split_dir=toy.split_dir)
    assert found.missing == []
    assert len(found.records) == toy.videos == 7 * 2
    by_split = {s: {r.class_name for r in found.records if r.split == s}
                for s in ("train", "val", "test")}
    assert {s: len(c) for s, c in by_split.items()} == {"train": 3, "val": 2, "test": 2}
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])
    for record in found.records:
        assert record.kind == "file" and record.path.endswith(".mp4")
        assert record.video_id.startswith(f"{record.class_name}/{record.class_name}_v")


def test_videos_are_real_files_of_the_asked_size(toy):
    frames = decode(sorted(Path(toy.root).rglob("*.mp4"))[0])
    assert frames.shape == (12, 48, 48, 3) and frames.dtype == np.uint8
    assert frames.std() > 5  # not a blank video


@pytest.mark.slow
def test_same_config_same_videos_other_seed_other_videos(toy, tmp_path):
    again = make_toy_dataset(tmp_path / "again", ToyConfig(**SMALL), progress=False)
    first, second = file_hashes(Path(toy.root)), file_hashes(Path(again.root))
    assert first.keys() == second.keys()
    # the rendered frames are identical; the H.264 bytes can differ in the last bits when another
    # FFmpeg build (decord bundles one) is loaded in the same process, so compare decoded pixels
    for name in first:
        a = decode(Path(toy.root) / name).astype(np.int16)
        b = decode(Path(again.root) / name).astype(np.int16)
        assert a.shape == b.shape and np.abs(a - b).mean() < 0.5
    assert (Path(again.split_dir) / "testlist.txt").read_text() == \
        (Path(toy.split_dir) / "testlist.txt").read_text()
    other = make_toy_dataset(tmp_path / "other", ToyConfig(**{**SMALL, "seed": 1}), progress=False)
    assert set(file_hashes(Path(other.root)).values()).isdisjoint(
        file_hashes(Path(toy.root)).values())


def test_rerun_reuses_and_changed_config_rewrites(tmp_path):
    first = make_toy_dataset(tmp_path, ToyConfig(**SMALL), progress=False)
    assert not first.reused
    assert make_toy_dataset(tmp_path, ToyConfig(**SMALL), progress=False).reused
    changed = make_toy_dataset(tmp_path, ToyConfig(**{**SMALL, "frames": 10}), progress=False)
    assert not changed.reused
    video = sorted((tmp_path / "videos").rglob("*.mp4"))[0]
    assert decode(video).shape[0] == 10


def test_classes_are_stroke_orders_and_each_split_holds_a_reversed_pair(toy):
    for names in toy.classes.values():
        assert all(n.count("-then-") == 1 for n in names)
    # whole (AB, BA) groups go to a split first: its first two classes differ only by order
    for split in ("train", "val", "test"):
        a, b = toy.classes[split][:2]
        first, second = a.split("-then-")
        assert b == f"{second}-then-{first}"


def test_motion_follows_the_class_inside_a_random_window(toy):
    truth = json.loads((Path(toy.out) / "toydata.json").read_text())
    cfg = ToyConfig(**truth["config"])
    windows, starts = set(), set()
    for video_id, plan in truth["videos"].items():
        windows.add(tuple(plan["window"]))
        starts.add(tuple(plan["path"][0]))
        first, second = video_id.split("/")[0].split("-then-")
        frames = render_video(plan, cfg).astype(float)
        actor = np.asarray(plan["actor"], float)
        centres = []
        for f in range(cfg.frames):
            close = np.abs(frames[f] - actor).max(axis=-1) < 2  # pixels of the actor's colour
            ys, xs = np.nonzero(close)
            centres.append(np.array([xs.mean(), ys.mean()]))
        begin, end = plan["window"]
        for f in range(begin):  # still before the window
            assert np.allclose(centres[f], centres[0], atol=0.5)
        for f in range(end, cfg.frames):  # and after it
            assert np.allclose(centres[f], centres[-1], atol=0.5)
        # the whole move is the two strokes of the class, in pixels
        length = cfg.stroke * cfg.size
        expected = (direction_vector(DIRECTIONS.index(first))
                    + direction_vector(DIRECTIONS.index(second))) * length
        assert np.allclose(centres[-1] - centres[0], expected, atol=1.5)
    assert len(windows) > 3 and len(starts) == len(truth["videos"])  # misaligned videos


def test_class_names():
    assert class_name((0, 2)) == "right-then-up"


def test_bad_config_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(cli, ["toy-data", "--out", str(tmp_path), "--train-classes",
                                      "40"])
    assert result.exit_code == 1
    assert "32 classes at most" in result.output


def test_cli_writes_and_prints_the_extract_command(tmp_path):
    out = tmp_path / "demo"
    args = ["toy-data", "--out", str(out), "--train-classes", "2", "--val-classes", "2",
            "--test-classes", "2", "--videos-per-class", "2", "--frames", "8", "--size", "32"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"--root {out / 'videos'} --split-dir {out / 'splits'}" in result.output
    assert len(list((out / "videos").rglob("*.mp4"))) == 12
