"""Small caches for the cache tests: a handful of rows of a tiny (C, T, H, W)."""

import numpy as np

SHAPE = (6, 4, 3, 3)


CLASSES = ["jump", "run", "swim"]


def row_values(row: int, shape=SHAPE) -> np.ndarray:
    """Deterministic, row-specific content that survives float16 exactly."""
    base = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 50
    return (base + row) / 8


def make_rows(n: int = 9):
    video_ids = [f"{CLASSES[i % 3]}/v{i:03d}" for i in range(n)]
    splits = ["train", "val", "test"] * (n // 3)
    labels = [i % 3 for i in range(n)]
    return video_ids, splits, labels
