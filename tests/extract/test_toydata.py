"""The built-in demo dataset: layout `extract --dataset custom` reads, determinism, the class's
poses in order inside a random window, at a random place."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from extract.datasets import find_videos
from extract.toydata import (
    LENGTH,
    POSES,
    REST_COLOUR,
    REST_RADIUS,
    ToyConfig,
    _plans,
    all_classes,
    class_name,
    make_toy_dataset,
    render_video,
    rgb_to_yuv420p,
    split_classes,
    write_video,
)

SMALL = dict(train_classes=3, val_classes=2, test_classes=2, videos_per_class=2, frames=12,
             size=64)


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
    assert frames.shape == (12, 64, 64, 3) and frames.dtype == np.uint8
    assert frames.std() > 5  # not a blank video


@pytest.mark.slow
def test_same_config_same_videos_other_seed_other_videos(toy, tmp_path):
    again = make_toy_dataset(tmp_path / "again", ToyConfig(**SMALL), progress=False)
    assert file_hashes(Path(toy.root)) == file_hashes(Path(again.root))  # the same bytes
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


def test_classes_are_pose_sequences_of_shared_poses(toy):
    names = [n for split in ("train", "val", "test") for n in toy.classes[split]]
    assert len(set(names)) == len(names)  # disjoint splits
    for name in names:
        poses = name.split("-")
        assert len(poses) == LENGTH == len(set(poses)) and set(poses) <= {p for p, _ in POSES}
    # the default dataset: every pose appears in the classes of every split
    default = split_classes(ToyConfig())
    for split, classes in default.items():
        assert {p for name in classes for p in name.split("-")} == {p for p, _ in POSES}, split


AREAS = {"disc": math.pi, "ring": math.pi * (1 - 0.44 ** 2), "square": 2.56, "diamond": 2.0,
         "cross": 2 * 2 * 0.64 - 0.64 ** 2, "saltire": 2 * 2 * 0.64 - 0.64 ** 2,
         "triangle": 3 * math.sqrt(3) / 4, "bar": 2 * 0.8, "frame": 1.76 ** 2 - 0.96 ** 2,
         "rest": math.pi * REST_RADIUS ** 2}  # in units of the actor's radius squared
# the outlines' lengths in radii: antialiasing blends a band of about a pixel along them, which
# the exact-colour count below misses
OUTLINES = {"disc": 2 * math.pi, "ring": 2 * math.pi * 1.44, "square": 6.4,
            "diamond": 4 * math.sqrt(2), "cross": 8.0, "saltire": 8.0, "triangle": 3 * math.sqrt(3),
            "bar": 5.6, "frame": 8 * (0.88 + 0.48), "rest": 2 * math.pi * REST_RADIUS}


def test_poses_follow_the_class_inside_a_random_window(toy):
    truth = json.loads((Path(toy.out) / "toydata.json").read_text())
    cfg = ToyConfig(**truth["config"])
    windows, centres, exponents = set(), set(), set()
    for video_id, plan in truth["videos"].items():
        windows.add(tuple(plan["window"]))
        centres.add(tuple(plan["centre"]))
        exponents.add(plan["exponent"])
        frames = render_video(plan, cfg).astype(float)
        colours = np.asarray([*plan["colours"], REST_COLOUR], float)  # the poses, then rest
        radius = plan["radius"]
        shown = []
        for f in range(cfg.frames):
            near = [(np.abs(frames[f] - c).max(axis=-1) < 2).sum() for c in colours]
            k = int(np.argmax(near))
            shown.append(k)
            # the pose's shape, by its area in pixels, at the video's place
            pose = plan["poses"][k] if k < 3 else "rest"
            area = AREAS[pose] * radius ** 2
            assert abs(near[k] - area) < 0.05 * area + 0.8 * OUTLINES[pose] * radius + 2, \
                (video_id, f)
            cy, cx = np.argwhere(np.abs(frames[f] - colours[k]).max(axis=-1) < 2).mean(0)
            assert abs(cx + 0.5 - plan["centre"][0]) < 2 and abs(cy + 0.5 - plan["centre"][1]) < 2
        begin, end = plan["window"]
        assert all(k == 3 for k in shown[:begin] + shown[end:])  # resting outside the window
        assert list(dict.fromkeys(shown[begin:end])) == [0, 1, 2], video_id  # the class's order
        assert video_id.split("/")[0] == "-".join(plan["poses"])
        assert 0 < end - begin < cfg.frames
    # misaligned in time window, speed and position
    assert len(windows) > 3 and len(exponents) == len(centres) == len(truth["videos"])


def test_class_names():
    assert class_name((0, 2, 4)) == "disc-square-triangle"
    assert len(all_classes()) == 9 * 8 * 7 == 504


def test_bad_config_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(cli, ["toy-data", "--out", str(tmp_path), "--train-classes",
                                      "600"])
    assert result.exit_code == 1
    assert "504 classes at most" in result.output


def test_cli_writes_and_prints_the_extract_command(tmp_path):
    out = tmp_path / "demo"
    args = ["toy-data", "--out", str(out), "--train-classes", "2", "--val-classes", "2",
            "--test-classes", "2", "--videos-per-class", "2", "--frames", "8", "--size", "32"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"--root {out / 'videos'} --split-dir {out / 'splits'}" in result.output
    assert len(list((out / "videos").rglob("*.mp4"))) == 12


def test_a_video_is_the_same_bytes_wherever_its_frames_lie_in_memory_and_every_time(tmp_path):
    """FFmpeg's own RGB -> YUV conversion rounded differently with the frame buffer's
    alignment (0 or 16 bytes past 64, as numpy happened to allocate), and x264's macroblock
    tree now and then gave other bytes for the same frames: neither is used any more."""
    cfg = ToyConfig(**SMALL)
    plans = [plan for videos in _plans(cfg).values() for _name, _label, plan in videos]
    frames = render_video(plans[1], cfg)  # the video whose bytes changed in 17 of 100 encodes
    hashes = set()
    for offset in (0, 16, 5, 0, 0, 0, 0, 0):
        buffer = np.empty(frames.nbytes + 64, np.uint8)
        start = (-buffer.ctypes.data) % 64 + offset
        moved = buffer[start:start + frames.nbytes].view(np.uint8).reshape(frames.shape)
        moved[...] = frames
        write_video(tmp_path / "video.mp4", moved, cfg.fps)
        hashes.add(hashlib.sha256((tmp_path / "video.mp4").read_bytes()).hexdigest())
    assert len(hashes) == 1


def test_colour_conversion_is_bt601_limited_range():
    image = np.array([[[255, 255, 255], [0, 0, 0]], [[255, 0, 0], [0, 0, 255]]], np.uint8)
    yuv = rgb_to_yuv420p(image)  # (3, 2): Y rows, then U and V of the one 2 x 2 block
    assert yuv.shape == (3, 2)
    assert yuv[:2].tolist() == [[235, 16], [82, 41]]  # white, black, red, blue
    u = (128 + 128 + 90 + 240 + 2) // 4  # each pixel's U, then the block's rounded mean
    v = (128 + 128 + 240 + 110 + 2) // 4
    assert yuv[2].tolist() == [u, v]
    # FFmpeg reads it back as the colour it was (a uniform frame: no chroma sharing)
    colour = np.full((16, 16, 3), (100, 150, 200), np.uint8)
    frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(colour), format="yuv420p")
    assert np.abs(frame.to_ndarray(format="rgb24").astype(int) - colour).max() <= 2
