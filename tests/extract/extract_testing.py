"""Generated inputs for the extract tests: small videos (mp4, webm), frame folders, a weights file.

The dataset (``custom``, 4 classes) has frame content that differs in every frame, so that taking a
wrong frame changes the features:

    train  jump/v0.mp4 (30 frames)   jump/v1.webm (24)   run/v0.webm (40)   run/v1/ (frames, 26)
    val    swim/v0.mp4 (5: shorter than T)  swim/v1.mp4 (corrupt)  swim/gone (listed, missing)
    test   walk/v0/ (frames, 32)    walk/v1.mp4 (36)
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import av
import numpy as np
import torch
import torchvision
import torchvision.transforms.v2.functional
from PIL import Image

WIDTH, HEIGHT = 64, 48


SMALL = ["--backbone", "resnet18", "--image-size", "64", "--resize", "72", "--frames", "8"]


VIDEOS = {
    "jump/v0": ("mp4", 30), "jump/v1": ("webm", 24), "run/v0": ("webm", 40),
    "run/v1": ("frames", 26), "swim/v0": ("mp4", 5), "swim/v1": ("corrupt", 0),
    "walk/v0": ("frames", 32), "walk/v1": ("mp4", 36),
}


SPLIT_LINES = {
    "train": ["jump/v0", "jump/v1", "run/v0", "run/v1"],
    "val": ["swim/v0", "swim/v1", "swim/gone"],
    "test": ["walk/v0", "walk/v1"],
}


CODECS = {"mp4": "libx264", "webm": "libvpx-vp9"}


def frame_image(seed: int, index: int) -> np.ndarray:
    """Frame ``index`` of video ``seed``: a smooth pattern shifted per frame, plus a frame stamp."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3)).astype(np.uint8)
    image = np.kron(base, np.ones((8, 8, 1), np.uint8))
    image = np.roll(image, 3 * index, axis=1)
    image[: HEIGHT // 4, : WIDTH // 4] = (index * 37) % 256
    return image


def write_video(path: Path, n_frames: int, codec: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_image(seed, i), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_frame_folder(folder: Path, n_frames: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_frames):  # unpadded names: natural order must still be 1, 2, ..., 10
        Image.fromarray(frame_image(seed, i)).save(folder / f"img_{i + 1}.png")


def build_dataset(root: Path, split_dir: Path, videos=VIDEOS, split_lines=SPLIT_LINES) -> None:
    for seed, (video_id, (kind, n)) in enumerate(sorted(videos.items())):
        if kind == "frames":
            write_frame_folder(root / video_id, n, seed)
        elif kind == "corrupt":
            target = root / f"{video_id}.mp4"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(np.random.default_rng(seed).bytes(4000))
        else:
            write_video(root / f"{video_id}.{kind}", n, CODECS[kind], seed)
    split_dir.mkdir(parents=True, exist_ok=True)
    for split, lines in split_lines.items():
        (split_dir / f"{split}list.txt").write_text("\n".join(lines) + "\n")


def decode_all(path: str) -> np.ndarray:
    """Every frame of a video file or frame folder, RGB uint8 (n, H, W, 3): the tests' reader."""
    if os.path.isdir(path):
        names = sorted(os.listdir(path), key=lambda s: int(s.split("_")[1].split(".")[0]))
        return np.stack([np.asarray(Image.open(os.path.join(path, n)).convert("RGB"))
                         for n in names])
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@functools.lru_cache(maxsize=2)
def _random_resnet18_state(seed: int) -> dict:
    """Random weights, with BN statistics measured on frame-like inputs: then the maps are of
    unit scale and depend strongly on the input (plain random init maps every input alike)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torchvision.models.resnet18(weights=None)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batch
    images = np.stack([frame_image(seed + i, i) for i in range(8)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = torchvision.transforms.v2.functional.resize(x, [64, 64], antialias=True)
    with torch.no_grad():
        net.train()(x - 0.45)
    return net.state_dict()


def random_resnet18(seed: int = 1) -> torchvision.models.ResNet:
    """A seeded random resnet18 with calibrated BN statistics (see _random_resnet18_state)."""
    net = torchvision.models.resnet18(weights=None)
    net.load_state_dict(_random_resnet18_state(seed))
    return net.eval()


TINY_VIDEOS = {"jump/v0": ("frames", 6), "jump/v1": ("frames", 7), "run/v0": ("frames", 8),
               "run/v1": ("corrupt", 0)}


TINY_LINES = {"train": ["jump/v0", "jump/v1"], "test": ["run/v0", "run/v1"]}


TINY = ["--backbone", "resnet18", "--image-size", "32", "--resize", "32", "--frames", "2",
        "--workers", "0", "--device", "cpu"]
