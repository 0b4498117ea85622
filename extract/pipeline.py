"""Phase one end to end: videos -> parallel decode -> batched backbone forward -> cache rows.

``run_extract(config, device)`` is what ``cli.py extract`` calls. The flow of one process:

    decode workers (DecodePool, processes)      one video each, crops of all its views (uint8)
      -> producer thread -> bounded queue       prefetch: at most ``prefetch`` decoded videos wait
      -> main thread: Batcher + forward         frames of several videos in one forward pass
      -> writer threads -> FeatureCache.write_row  compress + write while the next batch runs

On CUDA the backbone never waits while decoded frames are queued: a batch is run as soon as
``batch_size`` frames are ready, or with whatever is ready when the queue is empty. On a CPU the
backbone waits for a full batch (or the last videos): it shares the cores with the decoders, so
a partial batch would hand them the cores for only one video, and small batches run at a fraction
of a full one's rate per frame on busy cores (resnet18 @ 112 on the 2-core machine under load:
batch 8 ran about half as fast as 32; ``bench/extract_stages.py`` measures the pipeline against
its stages). Memory stays bounded whatever the dataset size (prefetch queue + one batch + a short
write queue).

Backbone: any name of the registry (``extract.backbones``); its library's preprocessing (mean,
std, resize filter, default image size and resize) replaces the ImageNet constants, and
``pool_to`` average-pools its maps to pool_to x pool_to. All of it is recorded in the attributes.

Resume: rows already done are skipped, except done rows whose stored data is missing (one
listing) or, with ``verify``, fails its checksum: those are marked not done and extracted again. A
cache made with other backbone, weights, preprocessing, pooling, frames, image size, resize, views,
dtype or selection of videos, or from split lists that changed since (a line removed or added, a
video moved to another split: named in the message), is refused unless ``overwrite``; a store
whose creation by extract was interrupted is created again. ``--out`` is checked before any work,
``overwrite`` replaces only a cache of this tool, and the creating process holds ``<out>.lock``
for the whole run, so a second extract on the same path (without torchrun) is refused instead of
recreating the cache under the first.

Scale-out (``torchrun``, or RANK / WORLD_SIZE set by hand, also across machines on a shared
filesystem): rank k extracts rows k, k+W, k+2W ... into the same Zarr store. Rank 0 creates the
cache; the others wait (up to ``wait_timeout``) until it is complete. Rows and done flags are
separate chunks, so writers never touch the same object. Error reports: one process writes attr
``errors`` = {"missing": [...], "failed": [{video, reason}]}; under W > 1 processes rank k writes
its failures to ``errors_rank<k>`` instead (a key of its own, written on a freshly opened group and
checked again after a pause, since every attribute write rewrites the whole attribute object).
``read_errors`` merges them and drops failures whose row is done by now. HDF5 is single-writer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cache import SPLITS, FeatureCache, UserError
from cache.codecs import CODECS, check_codec
from cache.errors import CacheInUse, NotACache
from cache.latest import default_cache_path, remember_cache
from cache.options import Range, option
from cache.paths import writer_lock
from cache.store import LEGACY_CODECS, check_output, inspect_path
from cache.store_dtype import STORE_DTYPES, store_format
from extract.backbone import FeatureExtractor, check_not_adapted_on
from extract.backbones import Backbone
from extract.datasets import (
    VideoList,
    VideoLocator,
    dataset_spec,
    explain_missing,
    find_videos,
)
from extract.decode import DecodeFailure, DecodePool, DecodeTask
from extract.gpu_decode import choose_decoder
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
from extract.producer import END, Batcher, Producer, Writers, default_workers, video_maps

SAMPLING = "tsn-centre"
_STARTED = datetime.now(UTC)
# Attributes that decide a row's content: a cache is resumed only if they all agree.
FINGERPRINT = ("dataset", "backbone", "weights_state_sha256", "frames", "image_size", "resize",
               "aug_views", "aug_seed", "aug_flip", "dtype", "sampling", "selection", "mean",
               "std", "interpolation", "pool_to", "store_dtype")
# What caches written before these attributes existed used (their backbones were all ResNets).
LEGACY = {"interpolation": "bilinear"}
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
        "halve float16's size; every reader gets --dtype rows back (see README 'Compact "
        "caches' for the accuracy cost).  [default: --dtype]", choices=STORE_DTYPES)
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


# ------------------------------------------------------------------------------ attributes
def code_version() -> str:
    """Package version, plus ``git describe`` when the code runs from a git checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("ta2n-cache")
    except PackageNotFoundError:
        release = "unknown"
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return release
    return f"{release}+{described}" if described else release


def prepare_backbone(config: ExtractConfig, device: torch.device) -> tuple[ExtractConfig, Backbone]:
    """Build the backbone of ``config`` on ``device``; fill in the sizes it decides."""
    backbone = Backbone.prepare(config.backbone, config.weights, config.seed, device,
                                image_size=config.image_size, resize=config.resize,
                                pool_to=config.pool_to, dtype=config.dtype)
    return replace(config, image_size=backbone.image_size, resize=backbone.resize), backbone


def build_attrs(config: ExtractConfig, backbone: Backbone, found: VideoList) -> dict:
    flip = dataset_spec(config.dataset).flip
    prep = backbone.preprocessing
    weights_attrs = backbone.weights.to_attrs()
    return {
        "dataset": config.dataset,
        "backbone": config.backbone,
        "backbone_info": {**backbone.spec.to_attrs(), "channels": backbone.grid[0],
                          "grid": list(backbone.grid[1:])},
        "weights": weights_attrs,
        "weights_state_sha256": weights_attrs["state_sha256"],
        "frames": config.frames,
        "dtype": config.dtype,
        "store_dtype": config.store_dtype,
        "aug_views": config.aug_views,
        "image_size": config.image_size,
        "resize": config.resize,
        "sampling": SAMPLING,
        "mean": list(prep.mean),
        "std": list(prep.std),
        "interpolation": prep.interpolation,
        "preprocessing": {**prep.to_attrs(), "image_size": config.image_size,
                          "resize": config.resize, "resize_shape": "square (frame squashed)",
                          "crop": "centre"},
        "grid": list(backbone.grid[1:]),
        "pool_to": config.pool_to,
        "aug_seed": config.seed if config.aug_views else None,
        "aug_flip": flip if config.aug_views else None,
        "augmentation": {"views": config.aug_views, "seed": config.seed, "flip": flip,
                         "frames": "random frame per segment", "crop": "random"},
        "selection": {"splits": list(config.splits), "limit": config.limit},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "extract_config": json.loads(json.dumps(asdict(config))),
        "errors": {"missing": list(found.missing), "failed": []},
    }


def _jsonable(value):
    return json.loads(json.dumps(value))


def fingerprint_mismatch(existing: dict, wanted: dict) -> list[str]:
    """Fingerprint attributes that differ, as 'name: cache X, this run Y'."""
    return [f"{key}: cache {existing.get(key, LEGACY.get(key))!r}, this run {wanted[key]!r}"
            for key in FINGERPRINT
            if existing.get(key, LEGACY.get(key)) != _jsonable(wanted[key])]


def read_errors(cache: FeatureCache) -> dict:
    """The merged error report: missing videos and failures of rows that are still not done."""
    attrs = cache.attrs
    report = attrs.get("errors") or {}
    done_ids = set(cache.video_ids[cache.done].tolist()) if len(cache) else set()
    failed: dict[str, str] = {}
    keys = sorted(k for k in attrs if k.startswith("errors_rank")) + ["errors"]
    for key in keys:  # a video failed in several reports keeps one reason
        for item in (attrs.get(key) or {}).get("failed", []):
            if item["video"] not in done_ids:
                failed[item["video"]] = item["reason"]
    return {"missing": list(report.get("missing", [])),
            "failed": [{"video": v, "reason": r} for v, r in sorted(failed.items())]}


# ------------------------------------------------------------------------------ the cache
def _create(config: ExtractConfig, found: VideoList, attrs: dict, shape) -> FeatureCache:
    if not found.records:
        raise UserError(
            f"no video of the {'/'.join(config.splits)} split lists was found under "
            f"{config.root} ({len(found.missing)} listed; "
            f"{explain_missing(config.dataset, config.root, found.missing)}); check --root")
    cache = FeatureCache.create(
        config.out, video_ids=[r.video_id for r in found.records],
        splits=[r.split for r in found.records], labels=[r.label for r in found.records],
        classes=found.classes, shape=shape, dtype=config.dtype, aug_views=config.aug_views,
        attrs=attrs, backend=config.backend, overwrite=True, codec=config.codec,
        store_dtype=config.store_dtype)
    cache.update_attrs(extract_ready=True)  # the mark other ranks wait for
    return cache


def _open_existing(config: ExtractConfig) -> FeatureCache | None:
    """The cache at ``config.out`` opened for writing; None if there is none yet, or only one
    whose creation by extract was interrupted (nothing in it is worth keeping)."""
    found = inspect_path(config.out, config.backend)
    if found.state in ("absent", "empty"):
        return None
    if found.state == "other":
        raise NotACache(f"{config.out} exists and is not a feature cache ({found.reason}); it is "
                        "never replaced: choose another --out")
    if not found.attrs.get("extract_ready"):
        if "extract_config" in found.attrs:
            return None  # created by an extract that was killed before it was ready
        raise UserError(f"{config.out} holds a cache that extract did not make (dataset "
                        f"{found.attrs.get('dataset')!r}); pass --overwrite to replace it, or "
                        "choose another --out")
    try:
        return FeatureCache.open(config.out, mode="r+", backend=config.backend)
    except (CacheInUse, NotACache):
        raise
    except UserError as e:  # a damaged cache of this tool: --overwrite may replace it
        raise UserError(f"{e.message}; pass --overwrite to replace it") from None


def _run_token() -> str | None:
    """torchrun's id of this launch (the same on every rank), if there is one."""
    token = os.environ.get("TORCHELASTIC_RUN_ID")
    return token if token and token != "none" else None


def _made_by_this_launch(attrs: dict) -> bool:
    """Whether a cache was (re)created by this launch's rank 0: same torchrun id, or else
    created after this process started (less a margin for clocks and start-up order)."""
    token = _run_token()
    if token:
        return attrs.get("run_id") == token
    return attrs.get("created", "") >= (_STARTED - timedelta(minutes=5)).isoformat(
        timespec="seconds")


def open_cache(config: ExtractConfig, shard: Shard, found: VideoList, attrs: dict,
               shape: tuple[int, int, int, int]) -> FeatureCache:
    """Rank 0 creates or resumes the cache; other ranks wait until it is there and matches."""
    attrs = {**attrs, "run_id": _run_token()}
    if shard.rank == 0:
        cache = None if config.overwrite else _open_existing(config)
        if cache is None:
            return _create(config, found, attrs, shape)
        problems = fingerprint_mismatch(cache.attrs, attrs)
        if problems:
            cache.close()
            raise UserError(f"{config.out} was extracted with other settings "
                            f"({'; '.join(problems)}); pass --overwrite to replace it, "
                            "or --out to write elsewhere")
        changes = found.changes_from(cache.video_ids, cache.splits)
        if changes:  # its rows would not be the videos the lists name now
            cache.close()
            raise UserError(f"{config.out}: the split lists changed since it was extracted "
                            f"({'; '.join(changes)}); pass --overwrite to extract it again "
                            "from the new lists, or --out to write elsewhere")
        return cache
    deadline = time.monotonic() + config.wait_timeout
    while True:
        try:
            cache = _open_existing(config)
        except UserError:
            cache = None  # rank 0 may be creating it right now
        if cache is not None:
            problems = fingerprint_mismatch(cache.attrs, attrs)
            if not problems and (not config.overwrite or _made_by_this_launch(cache.attrs)):
                return cache
            cache.close()
            if problems and not config.overwrite:
                raise UserError(f"{config.out} was extracted with other settings "
                                f"({'; '.join(problems)}); rank 0 will refuse it too")
        if time.monotonic() > deadline:
            raise UserError(f"rank {shard.rank}: no complete cache appeared at {config.out} "
                            f"within {config.wait_timeout:g} s; is rank 0 running?")
        time.sleep(1.0)


def _write_rank_errors(config: ExtractConfig, shard: Shard, report: dict, tries: int = 5) -> None:
    """Store this rank's failures under its own key, surviving other ranks' attribute writes."""
    key = f"errors_rank{shard.rank}"
    for _ in range(tries):
        with FeatureCache.open(config.out, mode="r+", backend=config.backend) as cache:
            cache.update_attrs(**{key: report})
        time.sleep(1.0 + 0.1 * shard.rank)  # another rank's stale rewrite lands within this pause
        with FeatureCache.open(config.out, backend=config.backend) as cache:
            if cache.attrs.get(key) == _jsonable(report):
                return


# ------------------------------------------------------------------------------ the run
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


def run_extract(config: ExtractConfig, device: torch.device, shard: Shard | None = None,
                echo=print) -> ExtractSummary:
    """Extract this process's shard of the dataset into ``config.out`` and summarise the run.

    ``--out`` is checked before any work, and the process that creates the cache (the only one,
    or rank 0) holds its writer lock throughout, so a second extract on the same path is
    refused instead of recreating the cache under the first one.
    """
    shard = shard or Shard.from_env()
    if config.backend == "hdf5" and shard.world_size > 1:
        raise UserError(f"the hdf5 backend takes one writer; WORLD_SIZE={shard.world_size} "
                        "processes need --backend zarr")
    check_output(config.out, config.backend)
    with writer_lock(config.out) if shard.rank == 0 else contextlib.nullcontext():
        return _run_extract(config, device, shard, echo)


def _run_extract(config: ExtractConfig, device: torch.device, shard: Shard,
                 echo) -> ExtractSummary:
    config = replace(config, decoder=choose_decoder(  # recorded in extract_config: the one used
        config.decoder, echo if shard.rank == 0 else lambda line: None))
    found = find_videos(config.dataset, config.root, splits=config.splits,
                        split_dir=config.split_dir, limit=config.limit)
    for warning in found.warnings if shard.rank == 0 else []:
        echo(f"warning: {warning}")
    config, backbone = prepare_backbone(config, device)
    check_not_adapted_on(config.weights, backbone.weights, config.dataset, config.root,
                         found.records)
    if backbone.weights.warning:
        echo(f"warning: {backbone.weights.warning}")
    channels, height, width = backbone.shape
    attrs = build_attrs(config, backbone, found)
    if found.missing and found.records and shard.rank == 0:  # (none found: _create says why)
        echo(f"{len(found.missing)} listed videos are missing under {config.root} (skipped; "
             f"{explain_missing(config.dataset, config.root, found.missing)}; full list in the "
             "cache's error report)")
    cache = open_cache(config, shard, found, attrs, (channels, config.frames, height, width))
    kept = cache.attrs.get("codec", LEGACY_CODECS[cache.backend])
    if kept != config.codec and shard.rank == 0:
        echo(f"note: {config.out} keeps the codec it was made with ({kept}); --codec "
             f"{config.codec} applies to new caches")
    try:
        rows = shard.rows(len(cache))
        done = cache.done[rows]
        damaged = damaged_rows(cache, rows[done], full=config.verify, echo=echo)
        done &= ~np.isin(rows, damaged)
        summary = ExtractSummary(config.out, shard.rank, shard.world_size, len(cache), len(rows),
                                 int(done.sum()), repaired=len(damaged), device=str(device))
        if shard.rank == 0:
            summary.missing = list(cache.attrs.get("errors", {}).get("missing", []))
        tasks = _tasks(config, cache, rows[~done], summary)
        if tasks:
            _extract(tasks, cache, backbone.extractor, RunPlan.make(config, device), summary)
    finally:
        cache.close()
    _finish(config, shard, summary)
    return summary


def damaged_rows(cache: FeatureCache, rows: np.ndarray, full: bool, echo=print) -> np.ndarray:
    """Done ``rows`` that are missing or damaged, now marked not done so that they are extracted
    again. Always: rows with no stored chunk (one listing); ``full`` (``--verify``): every row
    read and checked against its checksum."""
    if full and len(rows):
        with tqdm(total=len(rows), desc="verify", unit="row", dynamic_ncols=True) as bar:
            found = cache.verify(rows, progress=bar.update)
        bad = np.asarray([d.row for d in found], dtype=np.int64)
        example = f"{found[0].video_id}: {found[0].reason}" if found else ""
    else:
        bad = cache.missing_rows(rows)
        example = f"{cache.video_ids[bad[0]]}: no stored features" if len(bad) else ""
    if len(bad):
        echo(f"{len(bad)} done rows are missing or damaged (e.g. {example}); extracting them "
             "again")
        cache.mark_not_done(bad)
    return bad


def _tasks(config: ExtractConfig, cache: FeatureCache, rows: np.ndarray,
           summary: ExtractSummary) -> list[DecodeTask]:
    """One decode task per row to do; rows whose video is not on this machine are failures."""
    locator = VideoLocator(config.dataset, config.root)
    flip = dataset_spec(config.dataset).flip
    interpolation = cache.attrs.get("interpolation", LEGACY["interpolation"])
    tasks = []
    for row in rows.tolist():
        video_id = str(cache.video_ids[row])
        hit = locator.locate(video_id)
        if hit is None:
            summary.failed.append({"video": video_id, "reason": f"not found under {config.root}"})
            continue
        tasks.append(DecodeTask(row, video_id, hit[0], hit[1], config.frames, config.aug_views,
                                config.seed, config.resize, config.image_size, flip,
                                interpolation))
    return tasks


def _finish(config: ExtractConfig, shard: Shard, summary: ExtractSummary) -> None:
    """Store the error report, complete the summary, decide success, remember the cache."""
    if shard.world_size > 1:
        _write_rank_errors(config, shard, {"failed": summary.failed,
                                           "world_size": shard.world_size})
    elif summary.failed or summary.extracted:
        with FeatureCache.open(config.out, mode="r+", backend=config.backend) as cache:
            missing = cache.attrs.get("errors", {}).get("missing", [])
            cache.update_attrs(errors={"missing": missing, "failed": summary.failed})
    with FeatureCache.open(config.out, backend=config.backend) as cache:
        summary.done_rows = int(cache.done.sum())
        summary.cache_bytes = int(cache.info()["bytes_on_disk"])
    if summary.extracted == 0 and summary.already_done == 0 and summary.shard_rows:
        first = summary.failed[0]
        raise UserError(f"no video could be extracted ({len(summary.failed)} failed, e.g. "
                        f"{first['video']}: {first['reason']})")
    if shard.rank == 0:
        remember_cache(config.out, config.dataset)


def _extract(tasks: list[DecodeTask], cache: FeatureCache, extractor: FeatureExtractor,
             plan: RunPlan, summary: ExtractSummary) -> None:
    """Decode ``tasks`` in parallel, run the backbone on batches, write the rows."""
    pool = DecodePool(workers=plan.workers, timeout=plan.timeout, nice=plan.nice,
                      decoder=plan.decoder)
    producer = Producer(pool, tasks, capacity=plan.prefetch)
    rank = f" rank {summary.rank}" if summary.world_size > 1 else ""
    progress = tqdm(total=len(tasks), desc=f"extract{rank}", unit="video", dynamic_ncols=True)
    frames = int(cache.attrs["frames"])
    writer = Writers(cache, progress, capacity=max(8, 2 * plan.prefetch), threads=plan.writers)
    started = time.perf_counter()
    producer.start()
    writer.start()
    try:
        _feed_backbone(producer, writer, extractor, Batcher(plan.batch_size), frames, summary,
                       progress, plan.partial_batches)
        writer.finish()
    finally:
        producer.shutdown()
        if writer.is_alive():
            writer.finish()
        progress.close()
    if writer.error is not None:
        raise writer.error
    summary.seconds = time.perf_counter() - started
    summary.extracted = writer.written
    summary.frames = writer.frames


def _feed_backbone(producer: Producer, writer: Writers, extractor: FeatureExtractor,
                   batcher: Batcher, frames: int, summary: ExtractSummary, progress,
                   partial: bool = True) -> None:
    """The main loop: take decoded videos, run full (or, rather than wait, with ``partial``,
    partial) batches, hand finished videos to the writer."""
    finished = False
    while not finished or batcher.queue:
        # Take what is decoded; block only when there is nothing to run the backbone on.
        while not finished and batcher.waiting < batcher.batch_size:
            try:
                item = producer.out.get(block=batcher.waiting == 0 or not partial)
            except queue.Empty:
                break
            if item is END:
                finished = True
            elif isinstance(item, DecodeFailure):
                summary.failed.append({"video": item.video_id, "reason": item.reason})
                progress.update(1)
            else:
                if item.fallback_reason:
                    summary.fallbacks.append({"video": item.video_id,
                                              "reason": item.fallback_reason})
                batcher.add(item)
        for error in (producer.error, writer.error):
            if error is not None:
                raise error
        if batcher.waiting == 0:
            continue
        crops, owners = batcher.take()
        maps = extractor(crops)  # (B, C, h, w)
        for item in batcher.give(maps, owners):
            features, aug = video_maps(item, frames)
            writer.inbox.put((item.video.row, features, aug, len(item.frames)))
