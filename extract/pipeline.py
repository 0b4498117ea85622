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
listing) or, with ``verify``, fails its checksum: those are marked not done and extracted again.
``--out`` is checked before any work, and the creating process holds ``<out>.lock`` for the whole
run, so a second extract on the same path (without torchrun) is refused instead of recreating the
cache under the first. ``extract.output`` decides which existing cache may be resumed and how
the ranks share one.

Scale-out (``torchrun``, or RANK / WORLD_SIZE set by hand, also across machines on a shared
filesystem): rank k extracts rows k, k+W, k+2W ... (``extract.plan.Shard``) into the same Zarr
store. HDF5 is single-writer.

The options, this process's rows, the settings derived from them and the summary are in
``extract.plan``; the cache's attributes, its creation and resume and its error reports in
``extract.output``; the decode / batch / write machinery shared with adapt-backbone in
``extract.producer``.
"""

from __future__ import annotations

import contextlib
import queue
import time
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from cache import FeatureCache, UserError
from cache.latest import remember_cache
from cache.paths import writer_lock
from cache.store import LEGACY_CODECS, check_output
from extract.backbone import FeatureExtractor, check_not_adapted_on
from extract.backbones import Backbone
from extract.datasets import VideoLocator, dataset_spec, explain_missing, find_videos
from extract.decode import DecodeFailure, DecodePool, DecodeTask
from extract.gpu_decode import choose_decoder
from extract.output import LEGACY, build_attrs, open_cache, write_rank_errors
from extract.plan import ExtractConfig, ExtractSummary, RunPlan, Shard
from extract.producer import END, Batcher, Producer, Writers, video_maps


def prepare_backbone(config: ExtractConfig, device: torch.device) -> tuple[ExtractConfig, Backbone]:
    """Build the backbone of ``config`` on ``device``; fill in the sizes it decides."""
    backbone = Backbone.prepare(config.backbone, config.weights, config.seed, device,
                                image_size=config.image_size, resize=config.resize,
                                pool_to=config.pool_to, dtype=config.dtype)
    return replace(config, image_size=backbone.image_size, resize=backbone.resize), backbone


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
        write_rank_errors(config, shard, {"failed": summary.failed,
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
