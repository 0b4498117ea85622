"""Base-class adaptation of a backbone (`python cli.py adapt-backbone`): train it once as a TSN
classifier over the train split's classes, then freeze it and extract with it.

The few-shot literature's answer to a frozen backbone that carries too little (Tian et al. 2020;
Bertrand et al. 2023 cache features of a backbone trained on the base classes): the backbone
never sees a val / test class, and phase two stays minutes. One process of the job:

    train split only (val / test lists are read only to refuse classes they share with train)
      -> a seeded held-out slice of every class          scored after every epoch
      -> per epoch: a seeded order, global batches        rank k takes its micro-batches
      -> DecodePool + the extract producer thread         one training view per video and
                                                          epoch, decoded ahead, put in order
      -> backbone -> spatial mean -> linear               per-frame logits averaged over T (TSN)
      -> cross-entropy -> SGD or AdamW                    warm-up then cosine, set per step
      -> epoch end: BatchNorm statistics merged across ranks, held-out accuracy, last.pt
      -> the end: <out> (the backbone's plain state dict, in its library's key names)
                  and <out>.json (provenance: base classes, videos, epochs, recipe, sha256)

Training views are the paper's augmentation: a random frame per TSN segment, a random crop of
the resized square and a horizontal flip except on SSv2, drawn from (seed, video, epoch) only.

BatchNorm runs on batch statistics in training; its running statistics are the plain average
over the epoch's micro-batches (momentum None, reset every epoch), merged across ranks at the
epoch's end. That makes the exported statistics, like the weights, independent of how many
processes shared the work: W processes with micro-batch m give the one-process run with
micro-batch m (gradient accumulation) up to float rounding.

Resume: ``last.pt`` in the run folder (``<out without suffix>.run/``) holds the model, the
optimizer and the epoch; every random choice is a function of (seed, epoch), so ``--resume``
after a kill continues exactly as if uninterrupted, from the last finished epoch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cache import UserError
from cache.atomic import atomic_path, write_json
from cache.options import Range, option
from cache.paths import check_writable
from cache.torch_files import load_tensors, save_tensors
from extract.backbone import (
    ADAPT_FORMAT,
    WeightsInfo,
    file_sha256,
    sidecar_path,
    state_sha256,
)
from extract.backbones import BackboneSpec, parse_backbone
from extract.datasets import (
    VideoRecord,
    dataset_spec,
    find_videos,
    read_split_lines,
    split_list_files,
)
from extract.decode import DecodedVideo, DecodeFailure, DecodePool, DecodeTask
from extract.gpu_decode import choose_decoder
from extract.options import (
    BACKBONE_NAMES,
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
from extract.pipeline import Shard, code_version
from extract.producer import END, Producer, default_workers
from extract.sampling import ViewPlan, plan_views, random_view, view_rng

# This tool's default recipes, per dataset (not the paper's: TA2N fine-tunes episodically). SGD
# as TSN / TSM fine-tune ImageNet ResNets; AdamW for small custom sets, often from scratch.
RECIPES = {
    "ucf101": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, epochs=25,
                   batch_size=64, warmup=1.0),
    "hmdb51": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, epochs=25,
                   batch_size=64, warmup=1.0),
    "kinetics": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, epochs=25,
                     batch_size=64, warmup=1.0),
    "ssv2": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, epochs=15,
                 batch_size=64, warmup=1.0),
    "ssv2-cmn": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, epochs=25,
                     batch_size=64, warmup=1.0),
    "custom": dict(optimizer="adamw", lr=1e-3, momentum=0.9, weight_decay=0.05, epochs=30,
                   batch_size=16, warmup=1.0),
}
OPTIMIZERS = ("sgd", "adamw")


def adaptation_recipe(dataset: str) -> dict:
    """The default adaptation recipe of ``dataset``; an unknown name is an error (it once fell
    back silently to the custom recipe, training with AdamW where SGD was meant)."""
    if dataset not in RECIPES:
        raise UserError(f"unknown dataset {dataset!r} for adapt-backbone; choose one of "
                        f"{', '.join(RECIPES)}")
    return RECIPES[dataset]
# Independent random streams of one run, each seeded by (seed, stream, ...).
ORDER_STREAM, HELD_OUT_STREAM, VIEW_STREAM, INIT_STREAM = 1, 2, 3, 4
# Options that decide the trained weights: a resumed run must agree on all of them.
RESULT_FIELDS = ("dataset", "root", "split_dir", "limit", "backbone", "weights", "frames",
                 "image_size", "resize", "epochs", "batch_size", "micro_batch", "optimizer", "lr",
                 "momentum", "weight_decay", "warmup", "held_out", "seed")


@dataclass
class AdaptConfig:
    """Every option of ``cli.py adapt-backbone`` (stored in last.pt and the sidecar).

    Args:
        dataset, root, split_dir, limit: as for extract; only the train list is trained on
            (``limit``: its first N videos found).
        out: the weights file (default weights/<dataset>-<backbone>-base.pt).
        backbone, weights: the registry name and its initial weights (pretrained, none, file).
        frames: T, TSN segments per video (a random frame of each in training).
        image_size, resize: crop side and the square frames are resized to (None: the
            backbone's own).
        epochs, batch_size, optimizer, lr, momentum, weight_decay, warmup: the recipe (None:
            the dataset's, see RECIPES); batch_size is videos per optimizer step over all
            processes; warmup in epochs.
        micro_batch: videos per forward pass and process (None: batch_size / processes); the
            rest is gradient accumulation.
        held_out: fraction of every class's train videos kept out of training and scored.
        seed: every random choice (held-out slice, order, views, classifier init) derives from it.
        workers, timeout: decode processes and the per-video timeout, as for extract.
        resume, overwrite: continue the run in the run folder, or start again over it.
    """

    dataset: str = dataset_option(
        "Which split lists to use (custom: --split-dir). Only the train list is trained on.")
    root: str | None = root_option()
    split_dir: str | None = split_dir_option(
        "Folder with trainlist.txt, vallist.txt, testlist.txt (custom datasets).")
    limit: int | None = limit_option("Only the first N train videos found (for trying things).")
    out: str | None = option(
        None, help="Weights file.  [default: weights/<dataset>-<backbone>-base.pt]")
    backbone: str = backbone_option(f"Backbone to train: {BACKBONE_NAMES}, or timm:<name>.")
    weights: str = weights_option(
        "Initial weights: pretrained (ImageNet for the ResNets; 'imagenet' means the same), "
        "none (random), or a weights file.")
    frames: int = frames_option("TSN segments per video (a random frame of each per epoch).")
    image_size: int | None = image_size_option(
        "Crop side.  [default: the backbone's input size]")
    resize: int | None = resize_option(
        "Frames are resized to RESIZE x RESIZE before the random crop.  [default: image size / "
        "the backbone's crop fraction]")
    epochs: int | None = option(None, help="[default: the dataset's recipe]", range=Range(1),
                                kind=int)
    batch_size: int | None = option(
        None, help="Videos per optimizer step, over all processes.  [default: recipe]",
        range=Range(1), kind=int)
    micro_batch: int | None = option(
        None, help="Videos per forward pass and process; the rest is gradient accumulation.  "
        "[default: batch size / processes]", range=Range(1), kind=int)
    optimizer: str | None = option(None, help="[default: recipe]", choices=OPTIMIZERS)
    lr: float | None = option(None, help="Peak learning rate.  [default: recipe]", kind=float)
    momentum: float | None = option(None, help="SGD momentum.  [default: recipe]", kind=float)
    weight_decay: float | None = option(None, help="[default: recipe]", kind=float)
    warmup: float | None = option(
        None, help="Epochs of linear warm-up before the cosine decay.  [default: recipe]",
        kind=float)
    held_out: float = option(
        0.1, help="Fraction of each class's train videos kept out of training and scored.",
        range=Range(0, 1, high_open=True))
    seed: int = seed_option()
    workers: int | None = workers_option(
        "Decode processes (0: decode in the main process).  [default: as extract]")
    timeout: float = timeout_option("Seconds one video may take to decode.")
    decoder: str = decoder_option()
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        self.root = os.path.abspath(self.root or os.path.join("data", self.dataset))
        if self.out is None:
            name = self.backbone.replace(":", "-").replace("/", "-")
            self.out = os.path.join("weights", f"{self.dataset}-{name}-base.pt")
        for key, value in adaptation_recipe(self.dataset).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer takes {' or '.join(OPTIMIZERS)}, not {self.optimizer}")
        if not 0 <= self.held_out < 1:
            raise UserError("--held-out is a fraction of each class's videos, in [0, 1)")
        for name in ("frames", "epochs", "batch_size", "micro_batch", "image_size", "resize"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")

    @property
    def run_dir(self) -> Path:
        """Checkpoint, metrics and config of the run: next to the weights file."""
        return Path(self.out).with_suffix(".run")

    def result_fields(self) -> dict:
        return {k: getattr(self, k) for k in RESULT_FIELDS}


# ------------------------------------------------------------------------------ the videos
@dataclass
class BaseData:
    """The train split's videos: those trained on, those held out, and the base classes."""

    classes: list[str]
    train: list[VideoRecord]
    held_out: list[VideoRecord]
    missing: list[str]
    labels: dict[str, int]  # video id -> index into classes


def refuse_shared_classes(config: AdaptConfig) -> None:
    """Classes listed in train and in val or test would let the backbone see novel classes."""
    files = split_list_files(config.dataset, config.split_dir)
    names = {s: {line.split("/", 1)[0] for line in read_split_lines(files[s])} for s in files}
    shared = sorted(names["train"] & (names["val"] | names["test"]))
    if shared:
        raise UserError(f"classes {', '.join(shared[:3])}{' ...' if len(shared) > 3 else ''} "
                        "are in the train list and in the val / test lists: adapting on them "
                        "would show the backbone novel classes; make the splits disjoint")


def base_data(config: AdaptConfig) -> BaseData:
    """The train split (only) and its seeded held-out slice: round(held_out x n) videos of every
    class, at least one when held_out > 0 and the class has two videos or more."""
    refuse_shared_classes(config)
    found = find_videos(config.dataset, config.root, splits=("train",),
                        split_dir=config.split_dir, limit=config.limit)
    if any(r.split != "train" for r in found.records):  # the guarantee, checked where it matters
        raise AssertionError("adaptation was handed a video outside the train split")
    if not found.records:
        raise UserError(f"no video of the train list was found under {config.root} "
                        f"({len(found.missing)} listed); check --root")
    rng = np.random.default_rng([config.seed, HELD_OUT_STREAM])
    train, held = [], []
    for label in range(len(found.classes)):
        videos = sorted((r for r in found.records if r.label == label), key=lambda r: r.video_id)
        count = round(config.held_out * len(videos))
        if config.held_out > 0 and len(videos) >= 2:
            count = min(max(count, 1), len(videos) - 1)
        chosen = set(rng.choice(len(videos), size=count, replace=False).tolist())
        held += [v for i, v in enumerate(videos) if i in chosen]
        train += [v for i, v in enumerate(videos) if i not in chosen]
    labels = {r.video_id: r.label for r in found.records}
    return BaseData(found.classes, train, held, found.missing, labels)


@dataclass(frozen=True)
class ViewTask(DecodeTask):
    """One video's single view for adaptation: a training view of ``epoch`` (a random frame per
    segment, random crop, flip), or with ``epoch`` -1 the centre view (held-out scoring)."""

    epoch: int = -1

    def plan(self, n: int) -> list[ViewPlan]:
        if self.epoch < 0:
            return plan_views(n, frames=self.frames, video_id=self.video_id,
                              resize=self.resize, image_size=self.image_size)
        rng = view_rng(self.seed, self.video_id, self.epoch)
        return [random_view(n, self.frames, rng, resize=self.resize, image_size=self.image_size,
                            flip=self.flip)]


def view_tasks(records: list[VideoRecord], config: AdaptConfig, epoch: int,
               interpolation: str) -> list[ViewTask]:
    """Decode tasks in order; a task's ``row`` is its position (results are put back in order)."""
    seed = int(np.random.SeedSequence([config.seed, VIEW_STREAM]).generate_state(1)[0])
    flip = dataset_spec(config.dataset).flip
    return [ViewTask(i, r.video_id, r.path, r.kind, config.frames, 0, seed, config.resize,
                     config.image_size, flip, interpolation, epoch)
            for i, r in enumerate(records)]


class OrderedViews:
    """Decodes tasks ahead in worker processes (extract's pool and producer thread) and hands
    the results back in task order."""

    def __init__(self, tasks: list[ViewTask], workers: int, timeout: float, nice: int,
                 decoder: str = "cpu"):
        pool = DecodePool(workers=workers, timeout=timeout, nice=nice, decoder=decoder)
        self.producer = Producer(pool, tasks, capacity=max(8, 4 * max(workers, 1)))
        self.waiting: dict[int, DecodedVideo | DecodeFailure] = {}
        self.next = 0

    def __enter__(self) -> OrderedViews:
        self.producer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.producer.shutdown()

    def take(self, count: int) -> list[DecodedVideo | DecodeFailure]:
        """The next ``count`` results, in task order."""
        out = []
        while len(out) < count:
            if self.next in self.waiting:
                out.append(self.waiting.pop(self.next))
                self.next += 1
                continue
            item = self.producer.out.get()
            if item is END:
                raise self.producer.error or RuntimeError("the decode pool stopped early")
            self.waiting[item.row] = item
        return out


# ------------------------------------------------------------------------------ the model
class TSNClassifier(nn.Module):
    """A backbone as a TSN classifier: maps -> spatial mean -> linear -> per-frame logits,
    averaged over the T frames (TSN's consensus).

    Args:
        trunk: normalised (N, 3, S, S) -> (N, C, h, w), trainable.
        channels: C.
        classes: number of base classes.
        generator: draws the linear layer's init (normal, std 0.01, as TSN's new layers).
    """

    def __init__(self, trunk: nn.Module, channels: int, classes: int,
                 generator: torch.Generator):
        super().__init__()
        self.trunk = trunk
        self.fc = nn.Linear(channels, classes)
        with torch.no_grad():
            self.fc.weight.normal_(0, 0.01, generator=generator)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        maps = self.trunk(x.flatten(0, 1))  # (B*T, C, h, w)
        logits = self.fc(maps.float().mean((-2, -1)))  # (B*T, K)
        return logits.view(b, t, -1).mean(1)  # (B, K)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def merge_batchnorm(model: nn.Module, world: int) -> None:
    """Running statistics of all ranks -> their average (each rank saw as many micro-batches);
    batch counts summed: the statistics one process would have gathered over all of them."""
    if world == 1:
        return
    for bn in batchnorms(model):
        if bn.running_mean is None:
            continue
        for buffer in (bn.running_mean, bn.running_var):
            dist.all_reduce(buffer)
            buffer /= world
        dist.all_reduce(bn.num_batches_tracked)


def build_optimizer(model: nn.Module, config: AdaptConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; no weight decay on biases and norm weights (the grouping of
    timm.optim.param_groups_weight_decay, written out: importing timm costs seconds of CPU)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
              {"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


class Normalizer:
    """uint8 crops (B, T, 3, S, S) -> the backbone's normalised float input on the device."""

    def __init__(self, mean, std, device: torch.device):
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 1, 3, 1, 1) * 255

    def __call__(self, videos: list[DecodedVideo]) -> torch.Tensor:
        crops = torch.from_numpy(np.stack([v.views[0] for v in videos]))  # (B, T, 3, S, S)
        crops = crops.to(self.device, non_blocking=True)
        return (crops.float() - self.mean) / self.std  # (B, T, 3, S, S)


# ------------------------------------------------------------------------------ one run
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
    if spec.library == "open_clip":
        raise UserError("adapt-backbone trains torchvision and timm backbones; an open_clip "
                        "weights file holds both towers, which this job does not train")
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
        bn.momentum = None  # running statistics = the epoch's average (see the module docstring)
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


# ------------------------------------------------------------------------------ files
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


def exported_state(job: Job) -> dict[str, torch.Tensor]:
    """The backbone's state dict in its library's own key names (what extract --weights
    loads); for torchvision ResNets with the base-class classifier as ``fc`` (a complete
    torchvision model with K classes, whose fc extract ignores)."""
    state = job.model.trunk.state_dict()
    if job.spec.library == "timm":
        state = {k.removeprefix("model."): v for k, v in state.items()}
    if job.spec.library == "torchvision":
        state = {**state, "fc.weight": job.model.fc.weight, "fc.bias": job.model.fc.bias}
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def export(job: Job, failed: list[dict]) -> tuple[str, str]:
    """Write the weights file and its sidecar; check that the registry loads the file into
    exactly the trained backbone. Returns (file sha256, state sha256)."""
    config = job.config
    buffer = io.BytesIO()  # saved under a fixed archive name: same weights, same bytes, same hash
    torch.save(exported_state(job), buffer)
    with atomic_path(config.out) as tmp:
        tmp.write_bytes(buffer.getvalue())
    sha = file_sha256(config.out)
    trunk_sha = state_sha256(job.model.trunk)
    _, loaded = job.spec.load(config.out, config.seed, config.image_size)
    if loaded.state_sha256 != trunk_sha:
        raise RuntimeError(f"{config.out} does not load back into the trained {config.backbone}")
    last = job.history[-1] if job.history else None
    write_json(sidecar_path(config.out), {
        "format": ADAPT_FORMAT, "version": 1, "weights_sha256": sha, "state_sha256": trunk_sha,
        "dataset": config.dataset, "root": config.root, "split_dir": config.split_dir,
        "backbone": job.spec.to_attrs(), "init_weights": job.init.to_attrs(),
        "base_classes": job.data.classes, "epochs": config.epochs,
        "recipe": {k: getattr(config, k) for k in RESULT_FIELDS[5:]},
        "world_size": job.shard.world_size,
        "held_out_accuracy": last.held_out_accuracy if last else None,
        "train_accuracy": round(last.train_accuracy, 2) if last else None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version(), "failed": failed,
        "videos": [r.video_id for r in job.data.train],
        "held_out_videos": [r.video_id for r in job.data.held_out]})
    return sha, trunk_sha


def next_command(config: AdaptConfig) -> str:
    """The extract command that uses the adapted weights."""
    where = f" --root {config.root}" + (f" --split-dir {config.split_dir}"
                                        if config.split_dir else "")
    return (f"python cli.py extract --dataset {config.dataset}{where} --backbone "
            f"{config.backbone} --weights {config.out}")

