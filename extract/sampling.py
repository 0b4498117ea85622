"""TSN frame sampling and the crop / flip of each view (the paper's "standard way of TSN").

A video's n frames are split into T equal segments. The cached view takes the centre frame of each
segment, index ``floor((t + 0.5) * n / T)``, with a centre crop and no flip. Each augmented view
takes a random frame inside every segment, a random crop and (except on SSv2) a random horizontal
flip; its random generator is derived from (seed, video id, view), so a rerun, another rank, or a
different ``--limit`` reproduces exactly the same views.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ViewPlan:
    """What one view of a video takes: T frame indices, the crop's top-left corner, a flip."""

    indices: tuple[int, ...]
    top: int
    left: int
    flip: bool


def centre_indices(n: int, frames: int) -> np.ndarray:
    """Centre frame of each of ``frames`` equal segments; short videos repeat frames."""
    if n < 1:
        raise ValueError("a video needs at least one frame")
    t = np.arange(frames, dtype=np.int64)
    return ((2 * t + 1) * n) // (2 * frames)  # floor((t + 0.5) * n / T) in exact integers


def segment_bounds(n: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) of each segment; a segment shorter than one frame keeps its first frame."""
    t = np.arange(frames, dtype=np.int64)
    start = (t * n) // frames
    stop = np.maximum(((t + 1) * n) // frames, start + 1)
    return start, stop


def random_indices(n: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """One uniformly random frame inside each segment (TSN's training sampling)."""
    if n < 1:
        raise ValueError("a video needs at least one frame")
    start, stop = segment_bounds(n, frames)
    return rng.integers(start, stop)


def centre_offset(resize: int, size: int) -> int:
    """Top (or left) of a centre crop, rounded the way torchvision's ``center_crop`` rounds."""
    return int(round((resize - size) / 2.0))


def view_rng(seed: int, video_id: str, view: int) -> np.random.Generator:
    """The generator of one augmented view, derived from (seed, video id, view) only."""
    digest = hashlib.sha256(video_id.encode("utf-8")).digest()
    video_key = int.from_bytes(digest[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed), video_key, int(view)]))


def plan_views(
    n: int,
    *,
    frames: int,
    video_id: str,
    aug_views: int = 0,
    seed: int = 0,
    resize: int = 256,
    image_size: int = 224,
    flip: bool = True,
) -> list[ViewPlan]:
    """Plans of the cached view (first) and of ``aug_views`` augmented views of an n-frame video.

    Args:
        n: frames in the video.
        frames: T, frames per view.
        video_id: the split-list line; seeds the augmented views together with ``seed``.
        aug_views: number of augmented views.
        seed: the run's seed.
        resize: side of the square the frames are resized to before cropping.
        image_size: side of the crop.
        flip: whether augmented views may be flipped horizontally (False for SSv2).
    """
    centre = centre_offset(resize, image_size)
    plans = [ViewPlan(tuple(centre_indices(n, frames).tolist()), centre, centre, False)]
    for view in range(aug_views):
        plans.append(random_view(n, frames, view_rng(seed, video_id, view), resize=resize,
                                 image_size=image_size, flip=flip))
    return plans


def random_view(n: int, frames: int, rng: np.random.Generator, *, resize: int, image_size: int,
                flip: bool) -> ViewPlan:
    """One training view (TSN's, and the paper's augmentation): a random frame per segment, a
    random ``image_size`` crop of the ``resize`` square, and a coin-flip mirror if ``flip``."""
    indices = random_indices(n, frames, rng)
    top, left = (int(v) for v in rng.integers(0, resize - image_size + 1, size=2))
    flipped = bool(rng.random() < 0.5) if flip else False
    return ViewPlan(tuple(indices.tolist()), top, left, flipped)
