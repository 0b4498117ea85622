"""The one public frame reader of phase one: the T sampled frames of a cache row, re-decoded from
its video with the rule extraction used (the centre view: centre frame of each of T segments,
resize, centre crop), so the pixels are exactly those the cached features were computed from.

Phase two's figures read videos only through ``CacheFrames``; everything else in phase two sees
the cache alone.
"""

from __future__ import annotations

import os

import numpy as np

from extract.datasets import VideoLocator
from extract.decode import DecodeTask, decode_task


class FramesUnavailable(Exception):
    """A row's frames cannot be re-decoded; ``str(error)`` says why, in one line."""


class CacheFrames:
    """``frames(row)`` -> (T, S, S, 3) uint8 frames of a cache row (S the crop size).

    Args:
        attrs: the cache's attributes (dataset, extract_config.root, resize, image_size,
            interpolation).
        video_ids: the cache's ``video_id`` column.
        frames: T of the cache.
        root: the dataset folder, overriding the one recorded at extraction (it moved).
    """

    def __init__(self, attrs: dict, video_ids, frames: int, root: str | None = None):
        extract_cfg = attrs.get("extract_config") or {}
        self.video_ids, self.frames = video_ids, frames
        self.root = root or extract_cfg.get("root")
        self.resize = int(attrs.get("resize") or 256)
        self.image_size = int(attrs.get("image_size") or 224)
        self.interpolation = attrs.get("interpolation") or "bilinear"  # the backbone's filter
        self.reason = None  # why no row can be decoded, if so
        self.locator = None
        if not extract_cfg and root is None:
            self.reason = "the cache records no videos (not written by extract)"
        elif self.root is None or not os.path.isdir(self.root):
            self.reason = f"the dataset folder {self.root} is not here (pass --root DIR)"
        else:
            self.locator = VideoLocator(attrs.get("dataset"), self.root)

    def __call__(self, row: int) -> np.ndarray:
        """(T, S, S, 3) uint8; raises ``FramesUnavailable`` with the reason."""
        if self.locator is None:
            raise FramesUnavailable(self.reason)
        video_id = str(self.video_ids[row])
        hit = self.locator.locate(video_id)
        if hit is None:
            raise FramesUnavailable(f"{video_id} is not under {self.root}")
        task = DecodeTask(row=row, video_id=video_id, path=hit[0], kind=hit[1],
                          frames=self.frames, resize=self.resize, image_size=self.image_size,
                          interpolation=self.interpolation)
        failures = []
        for method in ("frames",) if hit[1] == "frames" else ("decord", "pyav"):
            try:
                views = decode_task(task, method).views  # (V, T, 3, S, S)
                return views[0].transpose(0, 2, 3, 1)  # (T, S, S, 3)
            except Exception as exc:  # a decoder's failure: the next one, then the caller says
                failures.append(f"{method}: {type(exc).__name__}: {exc}")
        raise FramesUnavailable(f"{video_id} does not decode ({'; '.join(failures)})")
