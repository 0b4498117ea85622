"""Feeding the heads: rows of one split, on the device, in the compute dtype.

``Feeder`` serves stacks of cache rows as (n, C, T, H, W) tensors. It either holds the whole split
in memory (``preload="ram"``: a float16 CPU tensor; ``"device"``: straight on the GPU), so no
episode ever waits on the disk, or streams rows from the cache with prefetching worker threads
(``"none"``) when the split does not fit. ``"auto"`` decides from the split's size and the free
memory, and says what it chose. Rows stay in the stored dtype (float16) until they reach the
device, where they are converted to the compute dtype.

A streamed batch is checked against the cache's generation after it is read: a cache rebuilt by
another command (``--overwrite``) while this one reads it stops the reader in one line.

In training on a cache with ``aug_features``, each row is served in the view the episode drew for
it; evaluation always reads ``features``.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from cache import FeatureCache, UserError
from cache.store import human_bytes

PRELOAD_CHOICES = ("auto", "ram", "device", "none")
MEMORY_SHARE = 0.5  # auto preloads when the split takes at most this share of the free memory
LOAD_ROWS = 256  # rows per slice while preloading (bounded reads, a moving progress bar)


def available_ram() -> int:
    """Bytes of memory the OS could give this process now (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_preload(requested: str, nbytes: int, device: torch.device) -> tuple[str, str]:
    """(mode, why): where the split lives, given what was asked, its size and free memory."""
    if requested not in PRELOAD_CHOICES:
        raise UserError(f"--preload must be one of {', '.join(PRELOAD_CHOICES)}")
    size = human_bytes(nbytes)
    if requested == "device" and device.type == "cpu":
        return "ram", f"preload device on a CPU device: the split ({size}) is held in RAM"
    if requested != "auto":
        return requested, f"preload {requested} (as asked): split of {size}"
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if nbytes <= MEMORY_SHARE * free:
            return "device", (f"preload auto -> device: the split ({size}) fits in "
                              f"{human_bytes(free)} free GPU memory")
    ram = available_ram()
    if nbytes <= MEMORY_SHARE * ram:
        return "ram", f"preload auto -> ram: the split ({size}) fits in {human_bytes(ram)} free RAM"
    return "none", (f"preload auto -> none: the split ({size}) is too large for "
                    f"{human_bytes(ram)} free RAM; streaming rows with worker threads")


def _read_unchecked(cache: FeatureCache, rows: np.ndarray, views: np.ndarray | None) -> np.ndarray:
    """Stored rows (n, C, T, H, W) without re-reading the done flags.

    The rows come from ``cache.rows(split)``, which already kept only done rows: checking them
    again on every episode would cost a store listing per episode.
    """
    return cache.read_rows(rows, views=views, check_done=False)


class Feeder:
    """Serves rows of one split of a cache as tensors on ``device`` in ``dtype``.

    Args:
        cache: the open cache.
        split: the split whose done rows are served.
        device: where the tensors go.
        dtype: the compute dtype (float32; the stored float16 is converted on the device).
        preload: "auto" | "ram" | "device" | "none" (see the module docstring).
        aug: serve ``aug_features`` views (training on a cache that has them).
        workers: reader threads when streaming.
        prefetch: requests read ahead when streaming.
        progress: show a progress bar while preloading.
    """

    def __init__(self, cache: FeatureCache, split: str, *, device: torch.device,
                 dtype: torch.dtype = torch.float32, preload: str = "auto", aug: bool = False,
                 workers: int = 4, prefetch: int = 8, progress: bool = True):
        self.cache, self.split, self.device, self.dtype = cache, split, device, dtype
        self.aug = bool(aug and cache.has_aug)
        self.workers, self.prefetch = max(1, workers), max(1, prefetch)
        self.rows = cache.rows(split)
        if len(self.rows) == 0:
            raise UserError(f"{cache.path}: split {split!r} has no done rows")
        itemsize = np.dtype(cache.attrs["dtype"]).itemsize
        views = cache.aug_views if self.aug else 1
        self.nbytes = len(self.rows) * int(np.prod(cache.shape)) * itemsize * views
        self.mode, self.reason = choose_preload(preload, self.nbytes, device)
        self.position = np.full(len(cache), -1, dtype=np.int64)
        self.position[self.rows] = np.arange(len(self.rows))
        self.data = None
        if self.mode != "none":
            array = "aug_features" if self.aug else "features"
            # Read the split in contiguous slices, keep it in the stored dtype (half the memory).
            data = torch.from_numpy(_read_unchecked_split(cache, self.rows, array, progress))
            cache.check_unchanged()  # the whole split is of the cache this command opened
            self.data = data.to(device) if self.mode == "device" else data

    def _to_device(self, stored: torch.Tensor) -> torch.Tensor:
        non_blocking = self.device.type == "cuda" and stored.is_pinned()
        return stored.to(self.device, non_blocking=non_blocking).to(self.dtype)

    def load(self, rows: np.ndarray, views: np.ndarray | None = None) -> torch.Tensor:
        """(n, C, T, H, W) maps of ``rows`` (each in its view ``views[i]`` when serving aug)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.data is None:
            stored = _read_unchecked(self.cache, rows, views if self.aug else None)
            self.cache.check_unchanged()  # rebuilt meanwhile: these rows are other videos
            return self._to_device(torch.from_numpy(stored))
        pos = self.position[rows]
        if (pos < 0).any():
            raise ValueError(f"rows {rows[pos < 0][:5].tolist()} are not done rows of {self.split}")
        index = torch.from_numpy(pos).to(self.data.device)
        if self.aug:
            view = torch.from_numpy(np.asarray(views, dtype=np.int64)).to(self.data.device)
            return self._to_device(self.data[index, view])  # (n, C, T, H, W)
        return self._to_device(self.data.index_select(0, index))  # (n, C, T, H, W)

    def stream(self, requests: Iterable[tuple[np.ndarray, np.ndarray | None]]
               ) -> Iterator[torch.Tensor]:
        """``load`` for each (rows, views) request in order; streaming reads ahead in threads."""
        if self.data is not None:
            for rows, views in requests:
                yield self.load(rows, views)
            return
        requests = iter(requests)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="feed") as pool:
            pending: deque = deque()

            def submit() -> bool:
                request = next(requests, None)
                if request is None:
                    return False
                rows, views = request
                pending.append(pool.submit(self._read, np.asarray(rows), views))
                return True

            while len(pending) < self.prefetch and submit():
                pass
            while pending:
                stored = pending.popleft().result()
                submit()
                yield self._to_device(stored)

    def _read(self, rows: np.ndarray, views: np.ndarray | None) -> torch.Tensor:
        """A worker's read: stored rows, in pinned memory when bound for a GPU (async copy)."""
        stored = torch.from_numpy(_read_unchecked(self.cache, rows, views if self.aug else None))
        self.cache.check_unchanged()  # rebuilt meanwhile: these rows are other videos
        return stored.pin_memory() if self.device.type == "cuda" else stored


def _read_unchecked_split(cache: FeatureCache, rows: np.ndarray, array: str,
                          progress: bool) -> np.ndarray:
    """All ``rows`` (sorted, done) of ``array``, read as contiguous slices of bounded size."""
    first = cache.read_rows(rows[:1], array=array, check_done=False)
    out = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = [run[i:i + LOAD_ROWS] for run in np.split(np.arange(len(rows)), breaks)
            for i in range(0, len(run), LOAD_ROWS)]
    with tqdm(total=len(rows), desc=f"loading {cache.path}", unit="row", disable=not progress,
              leave=False) as bar:
        for run in runs:
            out[run[0]:run[-1] + 1] = cache.read_rows(rows[run], array=array, check_done=False)
            bar.update(len(run))
    return out
