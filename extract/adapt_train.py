"""One run of adapt-backbone (``run_adapt``): prepare the job (sizes, videos, classifier,
optimizer), resume it, train the epochs (this process's micro-batches under DDP), score the
held-out videos, checkpoint every epoch, and export at the end.

Resume: ``last.pt`` in the run folder (``<out without suffix>.run/``) holds the model, the
optimizer and the epoch; every random choice is a function of (seed, epoch), so ``--resume``
after a kill continues exactly as if uninterrupted, from the last finished epoch.
"""

from __future__ import annotations

import csv
import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cache import UserError
from cache.atomic import atomic_path, write_json
from cache.paths import check_writable
from cache.torch_files import load_tensors, save_tensors
from extract.adapt import INIT_STREAM, ORDER_STREAM, AdaptConfig
from extract.adapt_data import BaseData, OrderedViews, base_data, view_tasks
from extract.adapt_export import export
from extract.adapt_model import (
    Normalizer,
    TSNClassifier,
    batchnorms,
    build_optimizer,
    lr_at,
    merge_batchnorm,
)
from extract.backbone import WeightsInfo, sidecar_path
from extract.backbones import BackboneSpec, check_adaptable, parse_backbone
from extract.datasets import VideoRecord
from extract.decode import DecodedVideo, DecodeFailure
from extract.gpu_decode import choose_decoder
from extract.plan import Shard
from extract.producer import default_workers


@dataclass
class EpochStats:
    """One line of metrics.csv."""

    epoch: int
    lr: float
    loss: float
    train_accuracy: float
    held_out_accuracy: float | None
    seconds: float
    frames_per_s: float


@dataclass
class AdaptSummary:
    """What a run did; ``lines()`` is what the command prints."""

    out: str
    sidecar: str
    backbone: str
    classes: int
    videos: int
    held_out: int
    epochs: int
    trained_epochs: int
    seconds: float
    frames: int
    device: str
    sha256: str | None = None
    state_sha256: str | None = None
    history: list[EpochStats] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    missing: int = 0
    stopped: bool = False

    def lines(self) -> list[str]:
        last = self.history[-1] if self.history else None
        rate = self.frames / self.seconds if self.seconds else 0.0
        lines = [f"adapted {self.backbone} on {self.classes} base classes ({self.videos} videos, "
                 f"{self.held_out} held out): {self.trained_epochs} epochs in {self.seconds:.1f} "
                 f"s, {rate:.1f} frames/s on {self.device}"]
        if last is not None:
            held = ("-" if last.held_out_accuracy is None
                    else f"{last.held_out_accuracy:.1f} %")
            lines.append(f"epoch {last.epoch}/{self.epochs}: loss {last.loss:.3f}, train accuracy "
                         f"{last.train_accuracy:.1f} %, held-out accuracy {held}")
        if self.stopped:
            lines.append(f"stopped after epoch {last.epoch if last else 0}: continue with "
                         "--resume")
        else:
            lines += [f"weights  {self.out} (sha256 {self.sha256[:16]}...)",
                      f"sidecar  {self.sidecar} (base classes, videos, recipe)"]
        if self.missing:
            lines.append(f"{self.missing} listed train videos are missing on disk (skipped)")
        for item in self.failed[:20]:
            lines.append(f"  failed  {item['video']}: {item['reason']}")
        return lines


@dataclass
class Job:
    """A prepared run: the resolved config, data, model and optimizer of this process."""

    config: AdaptConfig
    shard: Shard
    device: torch.device
    data: BaseData
    spec: BackboneSpec
    init: WeightsInfo
    interpolation: str
    model: TSNClassifier
    optimizer: torch.optim.Optimizer
    normalizer: Normalizer
    start_epoch: int = 0
    history: list[EpochStats] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data.train) // self.config.batch_size

    @property
    def accumulation(self) -> int:
        return self.config.batch_size // (self.config.micro_batch * self.shard.world_size)


def prepare(config: AdaptConfig, device: torch.device, shard: Shard) -> Job:
    """Resolve sizes and the micro-batch, read the videos, build the classifier and optimizer,
    and load last.pt on --resume."""
    spec = parse_backbone(config.backbone)
    check_adaptable(spec)
    check_writable(config.out, "file", "--out")  # before the work, not after an epoch
    check_writable(config.run_dir, "folder", "--out's run folder")
    prep = spec.preprocessing()
    image_size = config.image_size or prep.input_size
    config = replace(config, image_size=image_size,
                     resize=config.resize or prep.resize_for(image_size))
    config = replace(config, micro_batch=config.micro_batch
                     or config.batch_size // shard.world_size)
    if config.image_size > config.resize:
        raise UserError(f"--image-size {config.image_size} is larger than --resize "
                        f"{config.resize}")
    if config.batch_size % (config.micro_batch * shard.world_size):
        raise UserError(f"--batch-size {config.batch_size} is not a multiple of --micro-batch "
                        f"{config.micro_batch} x {shard.world_size} processes")
    data = base_data(config)
    if len(data.train) < config.batch_size:
        raise UserError(f"{len(data.train)} train videos (after {len(data.held_out)} held out) "
                        f"are fewer than --batch-size {config.batch_size}")
    trunk, init = spec.load(config.weights, config.seed, config.image_size)
    trunk.train().requires_grad_(True)
    with torch.no_grad():
        channels = trunk.eval()(torch.zeros(1, 3, config.image_size, config.image_size)).shape[1]
    trunk.train()
    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([config.seed, INIT_STREAM]).generate_state(1)[0]))
    model = TSNClassifier(trunk, channels, len(data.classes), generator)
    for bn in batchnorms(model):
        bn.momentum = None  # running statistics = the epoch's average (see adapt_model's docstring)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    job = Job(config, shard, device, data, spec, init, prep.interpolation, model,
              build_optimizer(model, config), Normalizer(prep.mean, prep.std, device))
    _open_run(job)
    return job


def _open_run(job: Job) -> None:
    """Resume from last.pt, or check that nothing of an earlier run would be overwritten."""
    config, run_dir = job.config, job.config.run_dir
    last = run_dir / "last.pt"
    if config.resume:
        if not last.exists():
            raise UserError(f"--resume: {last} does not exist (nothing to continue)")
        state = load_tensors(last, f"--resume: {last}")
        keys = ("config", "model", "optimizer", "epoch", "history", "failed")
        if not isinstance(state, dict) or not all(k in state for k in keys) \
                or not isinstance(state["config"], dict):
            raise UserError(f"--resume: {last} is not a checkpoint of adapt-backbone (it lacks "
                            f"{', '.join(keys)}); pass --overwrite to start again")
        saved = state["config"]
        differ = [f"{k}: run {saved.get(k)!r}, now {v!r}"
                  for k, v in json.loads(json.dumps(config.result_fields())).items()
                  if saved.get(k) != v]
        if differ:
            raise UserError(f"--resume: {run_dir} was started with other settings "
                            f"({'; '.join(differ)})")
        job.model.load_state_dict(state["model"])
        job.optimizer.load_state_dict(state["optimizer"])
        job.start_epoch = int(state["epoch"])
        job.history = [EpochStats(**row) for row in state["history"]]
        job.failed = dict(state["failed"])
        return
    if not config.overwrite and (last.exists() or os.path.exists(config.out)):
        there = last if last.exists() else config.out
        raise UserError(f"{there} exists: pass --resume to continue that run or --overwrite to "
                        "start again")


def run_adapt(config: AdaptConfig, device: torch.device, shard: Shard | None = None,
              echo=print, stop_after: int | None = None) -> AdaptSummary:
    """Adapt the backbone (this process's share under torchrun), write the weights file and its
    sidecar. ``stop_after``: return after that many epochs of this call, as a kill just after
    the epoch's checkpoint would (tests resume from there)."""
    shard = shard or Shard.from_env()
    owns_group = shard.world_size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        config = replace(config, decoder=choose_decoder(  # config.json records the one used
            config.decoder, echo if shard.rank == 0 else lambda line: None))
        job = prepare(config, device, shard)
        return _train(job, echo, stop_after)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(job: Job, echo, stop_after: int | None) -> AdaptSummary:
    config, shard = job.config, job.shard
    if shard.rank == 0:
        echo(f"adapt {config.backbone} ({job.init.description}) on {len(job.data.classes)} base "
             f"classes of {config.dataset}: {len(job.data.train)} videos, "
             f"{len(job.data.held_out)} held out; {config.epochs} epochs of "
             f"{job.steps_per_epoch} steps x {config.batch_size} videos x T={config.frames}")
        if job.init.source == "none":  # random features are meaningless; trained ones are not
            echo("starting from random weights: the base classes are all it will learn from")
        elif job.init.warning:
            echo(f"warning: {job.init.warning}")
        if job.start_epoch:
            echo(f"resuming {config.run_dir} after epoch {job.start_epoch}")
    net = job.model
    if shard.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            job.model, device_ids=[job.device.index] if job.device.type == "cuda" else None,
            broadcast_buffers=False)
    started, frames, trained, stopped = time.perf_counter(), 0, 0, False
    for epoch in range(job.start_epoch, config.epochs):
        stats, epoch_frames = _train_epoch(job, net, epoch)
        stats.held_out_accuracy = _score_held_out(job)
        job.history.append(stats)
        frames += epoch_frames
        trained += 1
        _checkpoint(job, epoch + 1)
        if stop_after is not None and trained >= stop_after and epoch + 1 < config.epochs:
            stopped = True
            break
    seconds = time.perf_counter() - started
    failed = _gather_failures(job)
    summary = AdaptSummary(config.out, sidecar_path(config.out), config.backbone,
                           len(job.data.classes), len(job.data.train), len(job.data.held_out),
                           config.epochs, trained, seconds, frames * shard.world_size,
                           str(job.device), history=job.history, failed=failed,
                           missing=len(job.data.missing), stopped=stopped)
    if not stopped:
        if shard.rank == 0:
            summary.sha256, summary.state_sha256 = export(job, failed)
        _barrier(shard)
    return summary


def _barrier(shard: Shard) -> None:
    if shard.world_size > 1:
        dist.barrier()


def _all_sum(values: list[float], shard: Shard) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if shard.world_size > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def _rank_batches(job: Job, epoch: int) -> list[list[VideoRecord]]:
    """This rank's micro-batches of the epoch, in step order: step s's global batch is cut into
    micro-batches j = 0, 1, ... and rank k takes those with j % world_size == k."""
    config, shard = job.config, job.shard
    order = np.random.default_rng([config.seed, ORDER_STREAM, epoch]).permutation(
        len(job.data.train))
    batches = []
    for step in range(job.steps_per_epoch):
        chosen = order[step * config.batch_size:(step + 1) * config.batch_size]
        micro = [chosen[j:j + config.micro_batch]
                 for j in range(0, config.batch_size, config.micro_batch)]
        batches += [[job.data.train[i] for i in m] for m in micro[shard.rank::shard.world_size]]
    return batches


def _train_epoch(job: Job, net: nn.Module, epoch: int) -> tuple[EpochStats, int]:
    """One pass over the train videos; returns the epoch's stats and this rank's frames."""
    config, shard = job.config, job.shard
    batches = _rank_batches(job, epoch)
    tasks = view_tasks([r for b in batches for r in b], config, epoch, job.interpolation)
    steps, accumulation = job.steps_per_epoch, job.accumulation
    total, warmup = steps * config.epochs, round(config.warmup * steps)
    for bn in batchnorms(job.model):
        bn.reset_running_stats()
    net.train()
    loss_sum = correct = seen = frames = 0.0
    started = time.perf_counter()
    bar = tqdm(total=steps, desc=f"adapt {epoch + 1}/{config.epochs}", unit="step",
               dynamic_ncols=True, disable=shard.rank != 0)
    plan = _plan_workers(config, job.device)
    with OrderedViews(tasks, *plan) as views:
        for step in range(steps):
            lr = lr_at(epoch * steps + step, total, warmup, config.lr)
            for group in job.optimizer.param_groups:
                group["lr"] = lr
            for micro in range(accumulation):
                results = views.take(len(batches[step * accumulation + micro]))
                last = micro == accumulation - 1
                with nullcontext() if last or net is job.model else net.no_sync():
                    loss, hits, count = _forward_backward(job, net, results, accumulation)
                loss_sum, correct, seen = loss_sum + loss, correct + hits, seen + count
                frames += count * config.frames
            job.optimizer.step()
            job.optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(f"loss {loss_sum / max(seen, 1):.3f}, "
                                f"{frames * shard.world_size / elapsed:.1f} frames/s",
                                refresh=False)
            bar.update()
    bar.close()
    merge_batchnorm(job.model, shard.world_size)
    loss_sum, correct, seen, all_frames = _all_sum([loss_sum, correct, seen, frames], shard)
    seconds = time.perf_counter() - started
    stats = EpochStats(epoch + 1, lr, loss_sum / max(seen, 1), 100 * correct / max(seen, 1),
                       None, round(seconds, 2), round(all_frames / seconds, 2))
    return stats, int(frames)


def _plan_workers(config: AdaptConfig, device: torch.device) -> tuple[int, float, int, str]:
    """(decode processes, timeout, niceness, decoder), as extract decides them."""
    workers = default_workers(device) if config.workers is None else config.workers
    return workers, config.timeout, 0 if device.type == "cuda" else 10, config.decoder


def _forward_backward(job: Job, net: nn.Module, results: list, accumulation: int):
    """Forward and backward of one micro-batch; failed videos are recorded and left out.
    Returns (loss x videos, correct, videos)."""
    videos = [r for r in results if isinstance(r, DecodedVideo)]
    for failure in (r for r in results if isinstance(r, DecodeFailure)):
        job.failed.setdefault(failure.video_id, failure.reason)
    if not videos:
        # every video of it failed: a zero-gradient step keeps the ranks' collectives in step
        return _empty_step(job, net), 0, 0
    labels = torch.tensor([job.data.labels[v.video_id] for v in videos], device=job.device)
    x = job.normalizer(videos)  # (B, T, 3, S, S)
    with _autocast(job.device):
        logits = net(x)  # (B, K)
    loss = F.cross_entropy(logits.float(), labels)
    (loss / accumulation).backward()
    hits = int((logits.argmax(1) == labels).sum())
    return loss.item() * len(videos), hits, len(videos)


def _empty_step(job: Job, net: nn.Module) -> float:
    size = job.config.image_size
    net.eval()  # no batch statistics from a blank input
    x = torch.zeros(1, 1, 3, size, size, device=job.device)  # (1, 1, 3, S, S)
    (net(x).sum() * 0).backward()
    net.train()
    return 0.0


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def _score_held_out(job: Job) -> float | None:
    """Accuracy (percent) on the held-out videos' centre views, ranks sharing them."""
    held = job.data.held_out[job.shard.rank::job.shard.world_size]
    if not job.data.held_out:
        return None
    job.model.eval()
    correct = seen = 0
    tasks = view_tasks(held, job.config, -1, job.interpolation)
    with OrderedViews(tasks, *_plan_workers(job.config, job.device)) as views:
        for start in range(0, len(held), job.config.micro_batch):
            results = views.take(min(job.config.micro_batch, len(held) - start))
            videos = [r for r in results if isinstance(r, DecodedVideo)]
            if not videos:
                continue
            labels = torch.tensor([job.data.labels[v.video_id] for v in videos],
                                  device=job.device)
            with _autocast(job.device):
                logits = job.model(job.normalizer(videos))  # (B, K)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(videos)
    job.model.train()
    correct, seen = _all_sum([correct, seen], job.shard)
    return round(100 * correct / seen, 2) if seen else None


def _checkpoint(job: Job, epochs_done: int) -> None:
    """last.pt (model, optimizer, epoch, history), metrics.csv, config.json: rank 0 writes."""
    if job.shard.rank == 0:
        run_dir = job.config.run_dir
        state = {"model": job.model.state_dict(), "optimizer": job.optimizer.state_dict(),
                 "epoch": epochs_done, "config": json.loads(json.dumps(asdict(job.config))),
                 "history": [asdict(h) for h in job.history], "failed": dict(job.failed),
                 "world_size": job.shard.world_size}
        save_tensors(state, run_dir / "last.pt")
        write_json(run_dir / "config.json", state["config"])
        with atomic_path(run_dir / "metrics.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(EpochStats)])
            writer.writeheader()
            writer.writerows(asdict(h) for h in job.history)
    _barrier(job.shard)


def _gather_failures(job: Job) -> list[dict]:
    failed = dict(job.failed)
    if job.shard.world_size > 1:
        every: list = [None] * job.shard.world_size
        dist.all_gather_object(every, failed)
        failed = {k: v for part in every for k, v in part.items()}
    return [{"video": v, "reason": r} for v, r in sorted(failed.items())]



