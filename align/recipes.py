"""The training recipes and the config of a training run (``TrainConfig``).

``paper`` is the authors' supplementary recipe per dataset, read from the cache's ``dataset``
attribute; ``fast`` (the default) is one recipe for every dataset, chosen by ``bench/recipes.py``
for time to accuracy with a frozen backbone. Options left unset (None) are filled from the recipe
by ``TrainConfig.resolve``. This module also holds what a recipe decides: the optimizer, the lr
schedule (a pure function of the step) and the early-stopping rule; align/train.py runs them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

from align.feed import PRELOAD_CHOICES
from align.models import check_head_options, head_names
from align.options import DEFAULT_SHOT, DEFAULT_WAY
from cache import UserError
from cache.datasets import DATASETS, DEFAULT_PAPER_RECIPE
from cache.options import Range, check_ranges, option


class _PaperRecipes(Mapping):
    """The paper's supplementary recipe of every dataset record that has one (cache/datasets.py),
    by name, as TrainConfig values; read from the records when asked, so a record added to the
    table is resolved like the others. "synthetic" is the `synth` cache's short schedule."""

    def __getitem__(self, name: str) -> dict:
        record = DATASETS.get(name)
        if record is None or record.paper is None:
            raise KeyError(name)
        return asdict(record.paper)

    def __iter__(self):
        return (name for name, record in DATASETS.items() if record.paper is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


PAPER_RECIPES = _PaperRecipes()

# One recipe for every dataset; the values are from the study in bench/recipes.py (docs/results.md).
FAST_RECIPE = dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="cosine", warmup=0,
                   dropout=0.5, tasks_per_batch=1, epochs=15, val_every=1, patience=5)
RECIPE_NAMES = ("fast", "paper")
OLD_TA2N_FIELDS = ("ttm", "tc", "sc", "sc_mode")  # TrainConfig fields before head_options
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("step", "cosine", "constant")


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved as config.json in the run directory.

    Each field's meaning, default and range is its ``option(...)`` declaration below, the one
    text ``python cli.py train-heads --help`` shows (cache/options.py). The fields left at None
    are filled from the recipe by ``resolve``; head_options are the head's own
    options (its ``OPTIONS``, e.g. TA2N's ttm, tc, sc, sc_mode: Table 3's and 4's switches;
    missing ones take the head's defaults); dataset is the cache's, recorded by ``resolve``.
    """

    cache: str | None = None
    head: str = option("ta2n", choices=head_names)
    head_options: dict = field(default_factory=dict)
    way: int = option(DEFAULT_WAY, help="N classes per episode.", range=Range(2))
    shot: int = option(DEFAULT_SHOT, help="K support videos per class.", range=Range(1),
                       flag="--shots")
    queries: int = option(5, help="Q query videos per class.", range=Range(1))
    seed: int = option(0)
    recipe: str = option("fast", choices=RECIPE_NAMES,
                         help="Defaults for the options below: fast (Adam, early stopping; any "
                              "dataset) or paper (the authors' SGD schedule for the cache's "
                              "dataset).")
    optimizer: str | None = option(None, choices=OPTIMIZERS, help="[default: recipe]")
    epochs: int | None = option(None, range=Range(1), kind=int,
                                help="Budget; cosine decays over it [default: recipe].")
    lr: float | None = option(None, range=Range(0, low_open=True), kind=float,
                              help="Peak learning rate [default: recipe].")
    schedule: str | None = option(None, choices=SCHEDULES,
                                  help="lr schedule after the warm-up [default: recipe; "
                                       "--lr-step implies step].")
    warmup: int | None = option(None, range=Range(0), kind=int,
                                help="Episodes of linear lr warm-up [default: recipe].")
    lr_step: int | None = option(None, range=Range(1), kind=int,
                                 help="Epochs per lr decay of the step schedule "
                                      "[default: paper recipe].")
    lr_gamma: float | None = option(None, range=Range(0), kind=float,
                                    help="lr factor per step of the step schedule "
                                         "[default: paper recipe].")
    momentum: float | None = option(None, range=Range(0, 1), kind=float,
                                    help="SGD only [default: paper recipe].")
    weight_decay: float | None = option(None, range=Range(0), kind=float,
                                        help="[default: recipe]")
    episodes_per_epoch: int = option(200, range=Range(1))
    tasks_per_batch: int | None = option(None, range=Range(1), kind=int,
                                         help="Episodes whose gradients are accumulated per "
                                              "optimizer step [default: recipe; the authors: "
                                              "16].")
    dropout: float | None = option(None, range=Range(0, 1, high_open=True), kind=float,
                                   help="On the input maps in training [default: recipe].")
    decay_every: int = option(40, range=Range(1),
                              help="Epochs between decays of the SC perturbation.")
    val_every: int | None = option(None, range=Range(1), kind=int,
                                   help="Epochs between validations [default: recipe].")
    val_episodes: int = option(500, range=Range(0), help="0: no validation.")
    val_queries: int = option(1, range=Range(1))
    patience: int | None = option(None, range=Range(0), kind=int,
                                  help="Stop after N validations without a better val "
                                       "accuracy; 0: never [default: recipe].")
    batch_episodes: int = option(16, range=Range(1),
                                 help="Validation episodes per scoring call.")
    micro_batch: int | None = option(None, range=Range(1), kind=int,
                                     help="Training episodes per forward/backward pass (never "
                                          "across an SGD step; same gradients).  [default: "
                                          "auto: as many as fit in half the free GPU memory, "
                                          "up to --tasks-per-batch; 1 on the CPU]")
    compile: bool = option(False, help="torch.compile the head (same results).")
    preload: str = option("auto", choices=PRELOAD_CHOICES,
                          help="Hold the split in RAM / on the device, or stream it.")
    workers: int = option(4, range=Range(0), help="Reader threads when streaming.")
    amp: bool = option(True, negatable=True, help="bfloat16 on CUDA.")
    out: str | None = option(None, help="Run directory [default: "
                                        "runs/<dataset>-<head>-<K>shot-<timestamp>].")
    dataset: str | None = None

    def resolve(self, dataset: str) -> tuple[TrainConfig, list[str]]:
        """(a new config with every value left at None filled from the recipe, notes to print).

        The fast recipe fills what it decides; the dataset's paper recipe fills what the fast
        one is silent on (SGD's momentum, the step schedule). ``self`` - the request - is left
        as it was, so that a run can record both (config.json's "requested" and "train").
        """
        if self.recipe not in RECIPE_NAMES:
            raise UserError(f"--recipe must be one of {', '.join(RECIPE_NAMES)}")
        notes = []
        paper = PAPER_RECIPES.get(dataset.lower())
        if paper is None:
            paper = PAPER_RECIPES[DEFAULT_PAPER_RECIPE]
            if self.recipe == "paper":
                notes.append(f"no recipe for dataset {dataset!r}: using the "
                             f"{DEFAULT_PAPER_RECIPE} recipe")
        cfg = replace(self, dataset=dataset)
        if cfg.schedule is None and (cfg.lr_step is not None or cfg.lr_gamma is not None):
            cfg = replace(cfg, schedule="step")  # asking for a step size means the step schedule
        cfg = cfg._filled(paper if cfg.recipe == "paper" else FAST_RECIPE)
        if cfg.optimizer == "sgd":
            cfg = cfg._filled({"momentum": paper["momentum"]})
        if cfg.schedule == "step":
            cfg = cfg._filled({"lr_step": paper["lr_step"], "lr_gamma": paper["lr_gamma"]})
        cfg._check()
        return cfg, notes

    def _filled(self, values: dict) -> TrainConfig:
        """A copy with ``values`` where this config has None."""
        return replace(self, **{k: v for k, v in values.items() if getattr(self, k) is None})

    def _check(self) -> None:
        """Refuse combinations that cannot mean what was asked (one line each), and values out
        of their declared range (the fields' ``option`` declarations)."""
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if self.momentum is not None and self.optimizer != "sgd":
            raise UserError(f"--momentum is SGD's; {self.optimizer} keeps its own moment "
                            "estimates (betas 0.9, 0.999)")
        if self.schedule != "step" and self.lr_step is not None:
            raise UserError(f"--lr-step / --lr-gamma belong to --schedule step, not "
                            f"{self.schedule}")
        for name in ("epochs", "tasks_per_batch", "val_every", "episodes_per_epoch", "way",
                     "shot", "queries", "val_queries", "batch_episodes", "decay_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr_step is not None and self.lr_step < 1:
            raise UserError("--lr-step must be at least 1")
        if self.patience < 0 or self.warmup < 0 or self.val_episodes < 0:
            raise UserError("--patience, --warmup and --val-episodes must be >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number, not {self.lr}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1) (1 would zero every input map), not "
                            f"{self.dropout}")
        for name in ("lr_gamma", "momentum", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UserError(f"--{name.replace('_', '-')} must be a number >= 0, not {value}")
        check_ranges(TrainConfig, asdict(self))
        check_head_options(self.head, self.head_options)

    @classmethod
    def from_json(cls, payload: dict, where: str = "config.json") -> TrainConfig:
        """The config stored in a run (config.json, a checkpoint); values of the wrong type (an
        edited or damaged file) are refused in one line naming the field."""
        if not isinstance(payload, dict):
            raise UserError(f"{where}: the training config must be a JSON object")
        payload = upgrade_train_payload(payload)
        values = {}
        for f in fields(cls):
            if f.name not in payload:
                continue
            value = payload[f.name]
            if not _json_fits(value, f.type):
                raise UserError(f"{where}: {f.name} is {value!r}, which is not a valid "
                                f"{f.type.replace(' | None', ' or null')}; restore the file")
            values[f.name] = float(value) if "float" in f.type and value is not None else value
        values.setdefault("recipe", "paper")  # runs from before the recipes were all paper's
        return cls(**values)


def upgrade_train_payload(payload: dict) -> dict:
    """A stored training config as this code reads it: runs before heads declared their own
    options kept TA2N's switches (ttm, tc, sc, sc_mode) as top-level fields for every head;
    TA2N's become its ``head_options``, the other heads' (unused) go."""
    old = {k: payload[k] for k in OLD_TA2N_FIELDS if k in payload}
    if not old or "head_options" in payload:
        return payload
    upgraded = {k: v for k, v in payload.items() if k not in OLD_TA2N_FIELDS}
    upgraded["head_options"] = old if payload.get("head", "ta2n") == "ta2n" else {}
    return upgraded


def _json_fits(value, annotation: str) -> bool:
    """Whether a JSON value fits a TrainConfig field's annotation ("int | None", "bool" ...)."""
    kinds = [kind.strip() for kind in annotation.split("|")]
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return "int" in kinds or "float" in kinds
    if isinstance(value, float):
        return "float" in kinds
    if isinstance(value, dict):
        return "dict" in kinds
    return isinstance(value, str) and "str" in kinds


# ------------------------------------------------------------------------------ helpers
def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer (a placeholder parameter keeps torch happy without any)."""
    params = params or [torch.zeros(1, requires_grad=True)]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def steps_per_epoch(cfg: TrainConfig) -> int:
    """Optimizer steps per epoch: one per tasks_per_batch episodes, plus one at the epoch's end
    for a partial batch."""
    return -(-cfg.episodes_per_epoch // cfg.tasks_per_batch)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The lr of optimizer step ``step`` (0-based): linear warm-up over ``warmup`` episodes,
    then the schedule. A pure function of the step, so a resumed run needs no scheduler state.

    step: lr x lr_gamma every lr_step epochs, multiplied one decay at a time as torch's StepLR
    does (bit for bit: the paper recipe's lr sequence is the one it had per epoch). cosine:
    torch's CosineAnnealingLR closed form from the end of the warm-up to the end of the budget.
    """
    warm = -(-cfg.warmup // cfg.tasks_per_batch)  # warm-up episodes in optimizer steps
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "step":
        lr = cfg.lr
        for _ in range((step // steps_per_epoch(cfg)) // cfg.lr_step):
            lr *= cfg.lr_gamma
        return lr
    if cfg.schedule == "cosine":
        span = max(1, cfg.epochs * steps_per_epoch(cfg) - warm)
        return cfg.lr * (1 + math.cos(math.pi * (step - warm) / span)) / 2
    return cfg.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def describe_recipe(cfg: TrainConfig) -> str:
    """One line: the resolved optimizer, schedule, budget and stopping rule."""
    opt = f"{cfg.optimizer} lr {cfg.lr:g}"
    if cfg.optimizer == "sgd":
        opt += f" momentum {cfg.momentum:g}"
    if cfg.weight_decay:
        opt += f" weight decay {cfg.weight_decay:g}"
    sched = (f"x{cfg.lr_gamma:g} every {cfg.lr_step} epochs" if cfg.schedule == "step"
             else {"cosine": "cosine to 0", "constant": "constant lr"}[cfg.schedule])
    if cfg.warmup:
        sched = f"{cfg.warmup} episodes warm-up, then {sched}"
    stop = (f"early stop after {cfg.patience} validations without improvement"
            if cfg.patience else "no early stopping")
    per_step = f"{cfg.tasks_per_batch} episode{'s' if cfg.tasks_per_batch > 1 else ''} per step"
    every = "every epoch" if cfg.val_every == 1 else f"every {cfg.val_every} epochs"
    return (f"{opt}, {sched}; {per_step}, dropout {cfg.dropout:g}; "
            f"{cfg.epochs} epochs x {cfg.episodes_per_epoch} episodes, validation {every}; {stop}")


def early_stop(cfg: TrainConfig, history: list[dict], best: float) -> str | None:
    """Why the run stops early (``patience`` validations without a new best), or None."""
    if not cfg.patience or validations_since_best(history) < cfg.patience:
        return None
    validated = [row for row in history if row["val_acc"] is not None]
    best_epoch = max(validated, key=lambda row: row["val_acc"])["epoch"]  # the first best
    return (f"early stop after epoch {history[-1]['epoch']}/{cfg.epochs}: no better val accuracy "
            f"in {cfg.patience} validations since epoch {best_epoch} (best {best:.2f}, in "
            "best.pt)")


def validations_since_best(history: list[dict]) -> int:
    """Validations since the best one (ties are not improvements: best.pt keeps the first)."""
    accs = [row["val_acc"] for row in history if row["val_acc"] is not None]
    if not accs:
        return 0
    return len(accs) - 1 - int(np.argmax(accs))
