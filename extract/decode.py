"""Decoding: video file or frame folder -> uint8 crops of every view, in killable worker processes.

``decode_task`` opens one video, plans its views (``task.plan``: ``sampling.plan_views``; a task
subclass may plan others, as adapt-backbone's one training view per epoch), decodes only the
frames those views need, resizes them to ``resize`` x ``resize`` (antialiased, on uint8 like the
paper's pipeline, with the backbone's filter: bilinear for the torchvision ResNets) and cuts each
view's crop (flipped if planned): a (V, T, 3, S, S) uint8 array.
Doing the whole preprocessing here keeps the backbone's process free for the forward pass and sends
the smallest arrays through the pipes.

``DecodePool`` runs ``decode_task`` in worker processes, one video at a time each, with a per-video
timeout: decord is known to hang forever on files whose container over-reports the frame count,
so a worker past its deadline is killed and replaced. A video that decord fails on (error, hang,
crash) is retried with PyAV; one that PyAV fails on too is reported as a ``DecodeFailure``.
Frame folders are read with PIL (no fallback). With ``decoder="gpu"`` (``--decoder``,
``extract.gpu_decode``) a video file goes to NVIDIA's hardware decoder first, and on to decord,
then PyAV, if the GPU rejects it.
"""

from __future__ import annotations

import multiprocessing
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait

import av
import decord
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from extract.datasets import FRAME_EXTENSIONS, natural_key
from extract.gpu_decode import read_gpu
from extract.sampling import ViewPlan, plan_views


@dataclass(frozen=True)
class DecodeTask:
    """Everything a worker needs to turn one video into its views' crops."""

    row: int
    video_id: str
    path: str
    kind: str  # "file" | "frames"
    frames: int
    aug_views: int = 0
    seed: int = 0
    resize: int = 256
    image_size: int = 224
    flip: bool = True
    interpolation: str = "bilinear"  # the backbone's resize filter (torchvision's mode names)

    def plan(self, n: int) -> list[ViewPlan]:
        """The views to cut from an n-frame video: the cached view, then the augmented ones."""
        return plan_views(n, frames=self.frames, video_id=self.video_id,
                          aug_views=self.aug_views, seed=self.seed, resize=self.resize,
                          image_size=self.image_size, flip=self.flip)


@dataclass
class DecodedVideo:
    """The crops of one video: ``views`` (V, T, 3, S, S) uint8, view 0 the cached view."""

    row: int
    video_id: str
    views: np.ndarray
    n_frames: int
    method: str
    fallback_reason: str | None = None


@dataclass(frozen=True)
class DecodeFailure:
    """A video no method could decode, and why."""

    row: int
    video_id: str
    reason: str


# ------------------------------------------------------------------------------ readers
Frames = dict[int, np.ndarray]  # frame index -> RGB uint8 (H, W, 3)
Picker = Callable[[int], list[int]]  # frame count -> the frame indices to decode


def _read_decord(path: str, pick: Picker) -> tuple[int, Frames]:
    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    n = len(reader)
    if n < 1:
        raise ValueError("the video has no frames")
    wanted = pick(n)
    batch = reader.get_batch(wanted).asnumpy()  # (U, H, W, 3)
    return n, dict(zip(wanted, batch))


def _read_pyav(path: str, pick: Picker) -> tuple[int, Frames]:
    """Count the frames by demuxing (cheap), then decode keeping only the picked ones; if fewer
    frames decode than packets were counted (a damaged stream), pick again from the true count."""
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("the file has no video stream")
        counted = sum(1 for packet in container.demux(video=0) if packet.size)
    n, frames = _decode_picked(path, pick, counted)
    if n != counted:
        n, frames = _decode_picked(path, pick, n)
    if n < 1:
        raise ValueError("the video has no frames")
    return n, frames


def _decode_picked(path: str, pick: Picker, n: int) -> tuple[int, Frames]:
    wanted = set(pick(n)) if n else set()
    frames = {}
    decoded = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for frame in container.decode(stream):
            if decoded in wanted:
                frames[decoded] = frame.to_ndarray(format="rgb24")
            decoded += 1
    return decoded, frames


def list_frame_files(folder: str) -> list[str]:
    """Image files of a frame folder, in natural name order."""
    names = [e.name for e in os.scandir(folder)
             if e.name.lower().endswith(FRAME_EXTENSIONS) and not e.name.startswith(".")]
    return [os.path.join(folder, name) for name in sorted(names, key=natural_key)]


def _read_frames(folder: str, pick: Picker) -> tuple[int, Frames]:
    files = list_frame_files(folder)
    if not files:
        raise ValueError("the frame folder holds no .jpg/.png frames")
    frames = {}
    for i in pick(len(files)):
        _check_regular(files[i])
        with Image.open(files[i]) as image:
            frames[i] = np.asarray(image.convert("RGB"))
    return len(files), frames


def _check_regular(path: str) -> None:
    """Refuse what is not a regular file before a decoder opens it: reading a named pipe (or a
    device) blocks forever, and in-process decoding (workers 0) has no timeout to end it."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path} is not a regular file (a named pipe, device or socket)")


READERS = {"gpu": read_gpu, "decord": _read_decord, "pyav": _read_pyav, "frames": _read_frames}
# The method a video file goes to when the one before failed on it.
NEXT_METHOD = {"gpu": "decord", "decord": "pyav"}


# ------------------------------------------------------------------------------ preprocessing
def crop_views(frames: Frames, plans: list[ViewPlan], *, resize: int, image_size: int,
               interpolation: str = "bilinear") -> np.ndarray:
    """Resize the decoded frames to ``resize`` squared once (antialiased, with the backbone's
    ``interpolation``), then cut every view (V, T, 3, S, S)."""
    order = sorted(frames)
    position = {index: i for i, index in enumerate(order)}
    sizes = {frames[i].shape for i in order}
    if len(sizes) != 1:
        raise ValueError(f"frames of different sizes {sorted(sizes)}")
    stack = torch.from_numpy(np.stack([frames[i] for i in order]))  # (U, H, W, 3)
    stack = stack.permute(0, 3, 1, 2)  # (U, 3, H, W)
    mode = InterpolationMode(interpolation)
    resized = tvf.resize(stack, [resize, resize], interpolation=mode,
                         antialias=True).numpy()  # (U, 3, R, R) uint8
    views = np.empty((len(plans), len(plans[0].indices), 3, image_size, image_size), np.uint8)
    for v, plan in enumerate(plans):
        rows = [position[i] for i in plan.indices]
        crop = resized[rows, :, plan.top:plan.top + image_size, plan.left:plan.left + image_size]
        views[v] = crop[..., ::-1] if plan.flip else crop
    return views


def decode_task(task: DecodeTask, method: str) -> DecodedVideo:
    """Decode one video with ``method`` (a ``READERS`` key) into its views' crops."""
    plans: list[ViewPlan] = []

    def pick(n: int) -> list[int]:
        plans[:] = task.plan(n)
        return sorted({i for plan in plans for i in plan.indices})

    if task.kind != "frames":
        _check_regular(task.path)
    n, frames = READERS[method](task.path, pick)
    views = crop_views(frames, plans, resize=task.resize, image_size=task.image_size,
                       interpolation=task.interpolation)
    return DecodedVideo(task.row, task.video_id, views, n, method)


def first_method(task: DecodeTask, decoder: str = "cpu") -> str:
    """The first reader of ``task``: frame folders read with PIL, files with ``decoder``'s."""
    if task.kind == "frames":
        return "frames"
    return "gpu" if decoder == "gpu" else "decord"


# ------------------------------------------------------------------------------ worker processes
def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".strip()


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when its parent exits, even while a decoder hangs."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: a hung orphan then lives until its decoder returns


def _worker_main(conn, decode_fn, nice: int) -> None:
    """Decode the tasks that arrive on ``conn`` one by one until None or the parent goes away."""
    _die_with_parent()
    torch.set_num_threads(1)  # the backbone's process owns the cores; a worker takes one
    if nice:
        os.nice(nice)  # on a CPU backbone, decoding must not preempt its threads
    # FFmpeg inside decord and PyAV prints to stderr about every broken file, garbling the
    # progress bar; the reasons reach the error report through the pipe instead.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    while True:
        try:
            message = conn.recv()
            if message is None:
                return
            conn.send(("started", None))  # the timeout runs from here, not from the fork
        except (EOFError, OSError, KeyboardInterrupt):
            return
        task, method = message
        try:
            reply = ("ok", decode_fn(task, method))
        except Exception as e:  # any decoder error is a property of the video: report it
            reply = ("error", _describe(e))
        try:
            conn.send(reply)
        except OSError:
            return


def _context():
    """forkserver: workers fork from a clean server (no CUDA, no thread pools) that has already
    imported the decoders, so starting or replacing a worker is cheap."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", "extract.decode"])
        return ctx
    return multiprocessing.get_context("spawn")


@dataclass
class _Job:
    task: DecodeTask
    method: str
    earlier: str | None = None  # why the previous method failed


class _Worker:
    """One decode process and the job it holds; its deadline starts when it acknowledges."""

    def __init__(self, ctx, decode_fn, nice: int = 0):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, decode_fn, nice),
                                   daemon=True)
        self.process.start()
        child.close()
        self.job: _Job | None = None
        self.deadline = float("inf")

    def send(self, job: _Job, grace: float) -> None:
        self.job = job
        self.deadline = time.monotonic() + grace
        self.conn.send((job.task, job.method))

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.kill()
        else:
            self.conn.close()


class DecodePool:
    """Decode many videos in worker processes, each video under a timeout, PyAV after decord
    (and decord after the GPU's decoder with ``decoder="gpu"``).

    Args:
        workers: number of worker processes; 0 decodes in the calling thread (no timeout).
        timeout: seconds one video may take in one method before its worker is killed.
        decode_fn: ``(task, method) -> DecodedVideo``, picklable (module level).
        nice: niceness added to the workers (a CPU backbone's threads should win the cores).
        decoder: "cpu" (decord first) or "gpu" (NVDEC first; ``gpu_decode.choose_decoder``).
    """

    startup_grace = 120.0  # a worker that does not even acknowledge its task in this time is hung

    def __init__(self, workers: int = 1, timeout: float = 60.0,
                 decode_fn: Callable[[DecodeTask, str], DecodedVideo] = decode_task,
                 nice: int = 0, decoder: str = "cpu"):
        self.workers = int(workers)
        self.decoder = decoder
        self.nice = int(nice)
        self.timeout = float(timeout)
        self.decode_fn = decode_fn
        self.killed_pids: list[int] = []
        self._ctx = None
        self._pool: list[_Worker] = []

    def start(self) -> DecodePool:
        """Start the workers now (their start-up then overlaps the caller's own preparations)."""
        if self.workers > 0 and not self._pool:
            self._ctx = _context()
            self._pool = [self._new_worker() for _ in range(self.workers)]
        return self

    def imap(self, tasks: Iterable[DecodeTask]) -> Iterator[DecodedVideo | DecodeFailure]:
        """Results in completion order; memory is bounded by how fast the caller consumes them.
        The workers are stopped when the results are exhausted (or the iterator is closed)."""
        if self.workers <= 0:
            yield from self._inline(tasks)
            return
        self.start()
        source, retries = iter(tasks), deque()
        try:
            while True:
                self._dispatch(source, retries)
                if all(w.job is None for w in self._pool):
                    return  # an idle pool after dispatching means nothing is left to do
                for job, outcome in self._collect():
                    if isinstance(outcome, DecodedVideo):
                        outcome.fallback_reason = job.earlier
                        yield outcome
                        continue
                    step = self._next_step(job, outcome)
                    if isinstance(step, DecodeFailure):
                        yield step
                    else:
                        retries.append(step)
        finally:
            for worker in self._pool:
                if worker.job is not None:
                    worker.kill()
                else:
                    worker.stop()
            self._pool = []

    def _dispatch(self, source: Iterator[DecodeTask], retries: deque[_Job]) -> None:
        """Give every idle worker a job: retries first, then new videos."""
        for i, worker in enumerate(self._pool):
            if worker.job is not None:
                continue
            if retries:
                job = retries.popleft()
            else:
                task = next(source, None)
                if task is None:
                    continue
                job = _Job(task, first_method(task, self.decoder))
            try:
                worker.send(job, self.startup_grace)
            except OSError:  # it died while idle: a fresh worker takes the job
                worker.kill()
                self._pool[i] = self._new_worker()
                self._pool[i].send(job, self.startup_grace)

    def _collect(self) -> list[tuple[_Job, DecodedVideo | str]]:
        """Wait for the next message or deadline; return finished jobs with result or reason."""
        busy = [w for w in self._pool if w.job is not None]
        wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
        ready = set(wait([w.conn for w in busy], timeout=wait_s))
        finished = []
        for i, worker in enumerate(self._pool):
            job = worker.job
            if job is None:
                continue
            if worker.conn in ready:
                try:
                    status, payload = worker.conn.recv()
                except (EOFError, OSError):
                    worker.process.join(timeout=5)
                    status = "error"
                    payload = f"worker process died (exit code {worker.process.exitcode})"
                    self._replace(i)
                if status == "started":
                    worker.deadline = time.monotonic() + self.timeout
                    continue
                worker.job = None
                finished.append((job, payload))
            elif time.monotonic() >= worker.deadline:
                self.killed_pids.append(worker.process.pid)
                self._replace(i)
                finished.append((job, f"timed out after {self.timeout:g} s"))
        return finished

    def _new_worker(self) -> _Worker:
        return _Worker(self._ctx, self.decode_fn, self.nice)

    def _replace(self, i: int) -> None:
        self._pool[i].kill()
        self._pool[i] = self._new_worker()

    @staticmethod
    def _next_step(job: _Job, reason: str) -> _Job | DecodeFailure:
        """After ``job`` failed: the next method's turn (``NEXT_METHOD``), else the video's
        failure; the reasons of every method tried are kept, in order."""
        reason = f"{job.method}: {reason}"
        reasons = f"{job.earlier}; {reason}" if job.earlier else reason
        if job.method in NEXT_METHOD:
            return _Job(job.task, NEXT_METHOD[job.method], reasons)
        return DecodeFailure(job.task.row, job.task.video_id, reasons)

    def _inline(self, tasks: Iterable[DecodeTask]) -> Iterator[DecodedVideo | DecodeFailure]:
        for task in tasks:
            job = _Job(task, first_method(task, self.decoder))
            while isinstance(job, _Job):
                try:
                    result = self.decode_fn(job.task, job.method)
                except Exception as e:  # a decoder error is a property of the video
                    job = self._next_step(job, _describe(e))
                    if isinstance(job, DecodeFailure):
                        yield job
                    continue
                result.fallback_reason = job.earlier
                yield result
                break
