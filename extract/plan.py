"""What one extract run is asked and what it decides: ``ExtractConfig`` (every option of
``cli.py extract``), ``Shard`` (this process's rows under torchrun), ``RunPlan`` (batch size,
decode processes, prefetch, writers, from the options and the device) and ``ExtractSummary``
(what the run did, as the command prints it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from cache import SPLITS, UserError
from cache.codecs import CODECS, check_codec
from cache.latest import default_cache_path
from cache.options import Range, option
from cache.store_dtype import STORE_DTYPES, store_format
from extract.options import (
    BACKBONE_NAMES,
    BACKBONE_PREFIXES,
    backbone_option,
    dataset_option,
    decoder_option,
    frames_option,
    image_size_option,
    limit_option,
    resize_option,
    root_option,
    seed_option,
    split_dir_option,
    timeout_option,
    weights_option,
    workers_option,
)
from extract.producer import default_workers

DEFAULT_CUDA_WRITERS = 4


@dataclass
class ExtractConfig:
    """Every option of ``cli.py extract`` (stored in the cache attributes as ``extract_config``)."""

    dataset: str = dataset_option("Which split lists to use (custom: --split-dir).")
    root: str | None = root_option()
    split_dir: str | None = split_dir_option(
        "Folder with trainlist.txt, vallist.txt, testlist.txt of '<class>/<stem>' lines "
        "(custom datasets).")
    splits: tuple[str, ...] = SPLITS  # the CLI's --splits is comma-separated text
    limit: int | None = limit_option(
        "Only the first N videos found per split (for trying things).")
    out: str | None = option(
        None, help="Cache path.  [default: caches/<dataset>.zarr (.h5 for hdf5)]")
    backend: str = option("zarr", choices=("zarr", "hdf5"))
    backbone: str = backbone_option(
        f"Frozen image backbone: {BACKBONE_NAMES}; {BACKBONE_PREFIXES}.")
    weights: str = weights_option(
        "pretrained (the library's weights through its download and cache: torchvision "
        "ImageNet, timm's tag, the clip tag; 'imagenet' means the same), none (random: "
        "meaningless features), or a weights file (ResNets: state dict, torchvision "
        "checkpoint, or the authors' TA2N checkpoint; timm / open_clip: what their loaders "
        "read).")
    frames: int = frames_option("Frames per video (TSN segments).")
    image_size: int | None = image_size_option(
        "Side of the (centre) crop fed to the backbone.  [default: the backbone's input size, "
        "224 for the ResNets]")
    resize: int | None = resize_option(
        "Frames are resized to RESIZE x RESIZE before cropping.  [default: image size / the "
        "backbone's crop fraction: 256 for the ResNets at 224]")
    pool_to: int | None = option(
        None, help="Average-pool each frame's map to N x N (e.g. a ViT-B/16's 14 x 14 to "
        "7 x 7).", range=Range(1), kind=int)
    aug_views: int = option(
        0, help="Extra training views per video (random frame per segment, random crop, flip "
        "except SSv2), stored in aug_features.", range=Range(0))
    seed: int = seed_option("Seed of the augmented views (and of --weights none).")
    dtype: str = option("float16", help="Dtype of the stored maps.",
                        choices=("float16", "float32"))
    store_dtype: str | None = option(
        None, help="How rows are stored: int8 (one scale per video and channel) or bfloat16 "
        "halve float16's size; every reader gets --dtype rows back (accuracy cost: "
        "docs/results.md, 'Compact caches').  [default: --dtype]", choices=STORE_DTYPES)
    codec: str | None = option(
        None, help="Row compressor (zarr; hdf5 takes gzip).  [default: zstd for zarr]",
        choices=CODECS)
    batch_size: int | None = option(
        None, help="Frames per forward pass.  [default: 256 on CUDA, 32 on CPU]",
        range=Range(1), kind=int)
    workers: int | None = workers_option(
        "Decode processes (0: decode in the main process, no timeout).  [default: cores-2 on "
        "CUDA; on CPU cores/8, at least 2]")
    writers: int | None = option(
        None, help="Threads compressing and writing rows (zarr; hdf5 takes 1).  [default: 4 "
        "on CUDA, 1 on CPU]", range=Range(1), kind=int)
    timeout: float = timeout_option(
        "Seconds one video may take to decode before its worker is killed (decord, then PyAV "
        "is tried).")
    decoder: str = decoder_option()
    overwrite: bool = False
    verify: bool = False  # read and check every done row before resuming
    wait_timeout: float = 900.0  # how long ranks > 0 wait for rank 0's cache

    def __post_init__(self):
        # absolute, so that visualize finds the videos from any working directory
        self.root = os.path.abspath(self.root or os.path.join("data", self.dataset))
        self.out = self.out or default_cache_path(self.dataset, self.backend)
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown or not self.splits:
            raise UserError(f"--splits takes a comma-separated list of {', '.join(SPLITS)}, "
                            f"not {','.join(self.splits) or 'nothing'}")
        self.splits = tuple(s for s in SPLITS if s in self.splits)
        if self.image_size and self.resize and self.image_size > self.resize:
            raise UserError(f"--image-size {self.image_size} is larger than --resize {self.resize}")
        for name in ("frames", "image_size", "resize", "pool_to"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.aug_views < 0:
            raise UserError("--aug-views must be 0 or more")
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be at least 1")
        if self.writers is not None and self.writers < 1:
            raise UserError("--writers must be at least 1")
        self.codec = check_codec(self.codec, self.backend)
        self.store_dtype = store_format(self.store_dtype, self.dtype).name


@dataclass(frozen=True)
class Shard:
    """This process's share of the rows: rows r with r % world_size == rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Shard:
        """From torchrun's RANK / WORLD_SIZE / LOCAL_RANK (one process when they are unset)."""
        try:
            rank = int(os.environ.get("RANK", 0))
            world = int(os.environ.get("WORLD_SIZE", 1))
            local = int(os.environ.get("LOCAL_RANK", rank))
        except ValueError:
            raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
        if world < 1 or not 0 <= rank < world:
            raise UserError(f"RANK={rank} is not within WORLD_SIZE={world}")
        return cls(rank, world, local)

    def rows(self, n: int) -> np.ndarray:
        return np.arange(self.rank, n, self.world_size)


@dataclass(frozen=True)
class RunPlan:
    """Settings derived from the options and the device."""

    batch_size: int  # frames per forward pass
    workers: int  # decode processes
    prefetch: int  # decoded videos that may wait for the backbone
    writers: int  # threads writing rows
    nice: int  # niceness of the decode processes
    timeout: float  # seconds per video and decoder
    decoder: str = "cpu"  # the video decoder tried first ("gpu": NVDEC)
    partial_batches: bool = True  # run what is decoded rather than wait for a full batch

    @classmethod
    def make(cls, config: ExtractConfig, device: torch.device) -> RunPlan:
        cuda = device.type == "cuda"
        batch_size = config.batch_size or (256 if cuda else 32)
        workers = default_workers(device) if config.workers is None else config.workers
        per_video = (1 + config.aug_views) * config.frames
        prefetch = max(2 * max(workers, 1), 2 * math.ceil(batch_size / per_video))
        # HDF5 takes one writer; a CPU backbone leaves no core for more than one
        writers = 1 if config.backend == "hdf5" else (
            config.writers or (DEFAULT_CUDA_WRITERS if cuda else 1))
        # A CPU backbone keeps every core busy: niced workers decode in the gaps instead of
        # stalling its OpenMP threads (a descheduled thread holds up the whole forward pass).
        return cls(batch_size, workers, prefetch, writers, 0 if cuda else 10, config.timeout,
                   config.decoder,
                   partial_batches=cuda or workers == 0)  # inline decoding: no waiting


@dataclass
class ExtractSummary:
    """What one process did; ``lines()`` is what the command prints."""

    cache_path: str
    rank: int
    world_size: int
    rows: int
    shard_rows: int
    already_done: int
    repaired: int = 0  # done rows found missing or damaged, extracted again
    extracted: int = 0
    frames: int = 0
    seconds: float = 0.0
    failed: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    fallbacks: list[dict] = field(default_factory=list)
    cache_bytes: int = 0
    done_rows: int = 0
    device: str = "cpu"

    def lines(self, show: int = 20) -> list[str]:
        rate = self.extracted / self.seconds if self.seconds else 0.0
        fps = self.frames / self.seconds if self.seconds else 0.0
        who = f"rank {self.rank}/{self.world_size}: " if self.world_size > 1 else ""
        lines = [
            f"{who}extracted {self.extracted} videos ({self.frames} frames) in "
            f"{self.seconds:.1f} s: {rate:.2f} videos/s, {fps:.1f} frames/s on {self.device}",
            f"{who}{self.already_done} already done, {len(self.failed)} failed, "
            f"{len(self.missing)} missing on disk; cache {self.done_rows}/{self.rows} rows done",
            f"cache {self.cache_path} ({self.cache_bytes / 2**20:.1f} MB)",
        ]
        if self.repaired:
            lines.append(f"{who}{self.repaired} done rows were missing or damaged and were "
                         "extracted again")
        if self.fallbacks:
            lines.append(f"{len(self.fallbacks)} videos decoded by PyAV after decord failed")
        for item in self.failed[:show]:
            lines.append(f"  failed  {item['video']}: {item['reason']}")
        for video in self.missing[:show]:
            lines.append(f"  missing {video}")
        hidden = max(0, len(self.failed) - show) + max(0, len(self.missing) - show)
        if hidden:
            lines.append(f"  ... {hidden} more in the cache's error report (attrs 'errors')")
        return lines
