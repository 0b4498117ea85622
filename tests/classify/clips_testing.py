"""Generated clips for the classify tests: small frame folders and videos whose frames differ, a
corrupt file, and a support / query layout as a person would make it."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image

SIDE = 40


def frame(seed: int, index: int) -> np.ndarray:
    """Frame ``index`` of clip ``seed``: a coarse random pattern moving with the frame."""
    rng = np.random.default_rng(seed)
    image = np.kron(rng.integers(0, 256, (SIDE // 8, SIDE // 8, 3)).astype(np.uint8),
                    np.ones((8, 8, 1), np.uint8))
    return np.roll(image, 3 * index, axis=1)


def frame_folder(folder: Path, seed: int, frames: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(frames):
        Image.fromarray(frame(seed, i)).save(folder / f"img_{i + 1:03d}.png")
    return folder


def video(path: Path, seed: int, frames: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = SIDE, SIDE, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame(seed, i),
                                                                   format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def corrupt(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(3000))
    return path


def support_and_queries(base: Path) -> tuple[Path, Path]:
    """support/{a,b,c}/ (a: 2 clips, b: 1, c: 1) and query/{a,b}/ + query/loose/: labelled and
    unlabelled clips, one of each kind (frame folder, mp4)."""
    support, query = base / "support", base / "query"
    frame_folder(support / "a" / "a1", 1)
    video(support / "a" / "a2.mp4", 2)
    frame_folder(support / "b" / "b1", 3)
    video(support / "c" / "c1.mp4", 4)
    frame_folder(query / "a" / "qa", 5)
    video(query / "b" / "qb.mp4", 6)
    frame_folder(query / "loose" / "q", 7)
    return support, query
