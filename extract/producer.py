"""The decode / batch / write machinery that ``extract`` and ``adapt-backbone`` share.

A ``Producer`` thread feeds decoded videos from a ``DecodePool`` into a bounded queue (``END``
marks its end), a ``Batcher`` packs their frames into forward batches and hands each video its
maps back (``video_maps``), and ``Writers`` threads write finished rows through the cache API
while the main thread runs the next batch. ``default_workers`` sizes the decode pool.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from cache import FeatureCache
from extract.decode import DecodedVideo, DecodePool, DecodeTask


# ------------------------------------------------------------------------------ batching
@dataclass
class Pending:
    video: DecodedVideo
    frames: np.ndarray  # (V*T, 3, S, S) uint8
    taken: int = 0
    outputs: list = field(default_factory=list)
    got: int = 0


class Batcher:
    """Packs the frames of queued videos into forward batches and reassembles each video's maps."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.queue: deque[Pending] = deque()
        self.waiting = 0  # frames not yet in a batch

    def add(self, video: DecodedVideo) -> None:
        frames = video.views.reshape(-1, *video.views.shape[2:])
        self.queue.append(Pending(video, frames))
        self.waiting += len(frames)

    def take(self) -> tuple[np.ndarray, list[tuple[Pending, int]]]:
        """Up to ``batch_size`` frames from the oldest videos, and who they belong to."""
        parts, owners, room = [], [], self.batch_size
        for item in self.queue:
            if room == 0:
                break
            count = min(room, len(item.frames) - item.taken)
            if count == 0:
                continue
            parts.append(item.frames[item.taken:item.taken + count])
            owners.append((item, count))
            item.taken += count
            room -= count
        self.waiting -= self.batch_size - room
        return np.concatenate(parts), owners

    def give(self, maps: torch.Tensor, owners: list[tuple[Pending, int]]) -> list[Pending]:
        """Hand a batch's maps back to their videos; return the videos now complete."""
        start = 0
        for item, count in owners:
            item.outputs.append(maps[start:start + count])
            item.got += count
            start += count
        complete = []
        while self.queue and self.queue[0].got == len(self.queue[0].frames):
            complete.append(self.queue.popleft())
        return complete


def video_maps(item: Pending, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """A complete video's maps: cached view (C, T, h, w) and augmented views (V-1, C, T, h, w)."""
    maps = torch.cat(item.outputs)  # (V*T, C, h, w)
    maps = maps.view(-1, frames, *maps.shape[1:]).permute(0, 2, 1, 3, 4)  # (V, C, T, h, w)
    maps = maps.numpy()
    return maps[0], maps[1:]


# ------------------------------------------------------------------------------ threads
END = object()


class Producer(threading.Thread):
    """Feeds decoded videos (and failures) from the pool into a bounded queue."""

    def __init__(self, pool: DecodePool, tasks: list[DecodeTask], capacity: int):
        super().__init__(daemon=True)
        self.pool, self.tasks = pool, tasks
        self.out: queue.Queue = queue.Queue(maxsize=capacity)
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        results = self.pool.imap(self.tasks)
        try:
            for item in results:
                while not self.stop.is_set():
                    try:
                        self.out.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    break
        except BaseException as e:  # handed to the main thread, which re-raises it
            self.error = e
        finally:
            results.close()  # kills or stops the workers
            self.out.put(END)

    def shutdown(self) -> None:
        self.stop.set()
        while self.is_alive():
            try:
                self.out.get(timeout=0.1)
            except queue.Empty:
                pass


class Writers:
    """Threads that write finished rows through the cache API while the main thread runs the
    next batch. Several threads overlap the compression and file writes of different rows (a
    GPU backbone outruns one writer: one H100 made 31 rows/s = 50 MB/s, the rate of one Zarr
    writer thread); Zarr keeps every row in its own objects, so writers never share one. HDF5
    takes one thread (``RunPlan.make``)."""

    def __init__(self, cache: FeatureCache, progress: tqdm, capacity: int, threads: int = 1):
        self.cache, self.progress = cache, progress
        self.inbox: queue.Queue = queue.Queue(maxsize=capacity)
        self.error: BaseException | None = None
        self.written = 0
        self.frames = 0
        self.started = time.perf_counter()
        self._count = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def finish(self) -> None:
        """Let every thread write what is queued, then stop them."""
        for _ in self._threads:
            self.inbox.put(END)
        for thread in self._threads:
            thread.join()

    def is_alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _run(self) -> None:
        while True:
            item = self.inbox.get()
            if item is END:
                return
            if self.error is not None:
                continue  # drain, so the main thread never blocks on a full inbox
            row, features, aug, n_frames = item
            try:
                self.cache.write_row(row, features, aug if aug.shape[0] else None)
            except BaseException as e:  # handed to the main thread, which re-raises it
                self.error = e
                continue
            with self._count:
                self.written += 1
                self.frames += n_frames
                elapsed = max(time.perf_counter() - self.started, 1e-9)
                self.progress.set_postfix_str(f"{self.frames / elapsed:.1f} frames/s",
                                              refresh=False)
                self.progress.update(1)


def default_workers(device: torch.device) -> int:
    """Decode processes: on CUDA all cores but the feeding one; on CPU few, as they steal cores
    from the backbone (one decoding process keeps up with a CPU ResNet on ~8 cores), but at
    least two where there are two cores: while the backbone waits for a batch, both decode."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if device.type == "cuda":
        return max(1, min(cores - 2, 32))
    return max(min(2, cores), cores // 8)
