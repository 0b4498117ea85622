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

The job, one module per concern:

    adapt.py            AdaptConfig (every option of the command) and the per-dataset recipes
    adapt_data.py       the train split's videos, the held-out slice, the training views
    adapt_model.py      the TSN classifier, BatchNorm merging, optimizer, learning-rate schedule
    adapt_train.py      one run: prepare, resume, the epochs (DDP), checkpoints, the summary
    adapt_export.py     the weights file in its library's key names and the provenance sidecar
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from cache import UserError
from cache.datasets import DATASETS, video_datasets
from cache.options import Range, option
from extract.options import (
    ADAPTABLE_BACKBONES,
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

OPTIMIZERS = ("sgd", "adamw")


def adaptation_recipe(dataset: str) -> dict:
    """The default adaptation recipe of ``dataset`` (its record's, cache/datasets.py); an unknown
    name is an error (it once fell back silently to the custom recipe, training with AdamW where
    SGD was meant)."""
    if dataset not in video_datasets():
        raise UserError(f"unknown dataset {dataset!r} for adapt-backbone; choose one of "
                        f"{', '.join(video_datasets())}")
    return asdict(DATASETS[dataset].adaptation)
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
            the dataset's record, see adaptation_recipe); batch_size is videos per optimizer
            step over all processes; warmup in epochs.
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
    backbone: str = backbone_option(f"Backbone to train: {ADAPTABLE_BACKBONES}.")
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


def next_command(config: AdaptConfig) -> str:
    """The extract command that uses the adapted weights."""
    where = f" --root {config.root}" + (f" --split-dir {config.split_dir}"
                                        if config.split_dir else "")
    return (f"python cli.py extract --dataset {config.dataset}{where} --backbone "
            f"{config.backbone} --weights {config.out}")

