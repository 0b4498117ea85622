"""Row ranges for reads: sorted rows as slices one read can take, in bounded batches, and the
rows still holding the fill value (a missing chunk reads as NaN, never as zeros)."""

from __future__ import annotations

import numpy as np


def _contiguous_runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Split sorted row indices into (start, stop, offset) runs that one slice can read."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


def _batched(runs: list[tuple[int, int, int]], size: int) -> list[tuple[int, int, int]]:
    """The same runs, cut into pieces of at most ``size`` rows."""
    return [(a, min(a + size, stop), offset + a - start)
            for start, stop, offset in runs for a in range(start, stop, size)]


def fill_rows(block: np.ndarray, fill) -> np.ndarray:
    """Indices of the rows of ``block`` (n, ...) that hold the fill value everywhere: rows whose
    chunk is not in the store. A few sampled values rule out almost every real row first, so the
    full comparison runs only on suspects."""
    if fill is None or len(block) == 0 or block[0].size == 0:
        return np.zeros(0, dtype=np.int64)
    flat = block.reshape(len(block), -1)  # (n, values)
    nan = bool(np.isnan(fill))

    def is_fill(values: np.ndarray) -> np.ndarray:
        return np.isnan(values) if nan else values == fill

    sample = flat[:, ::max(1, flat.shape[1] // 16)]  # (n, <= 32)
    suspects = np.flatnonzero(is_fill(sample).all(axis=1))
    return np.asarray([i for i in suspects if is_fill(flat[i]).all()], dtype=np.int64)

