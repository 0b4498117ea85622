"""Episodic training of an alignment head from a feature cache (`python cli.py train-heads`).

The loop (``train``) reads top to bottom: episodes from the train split -> dropout on the maps ->
head -> cross-entropy summed over the queries -> gradients accumulated over ``tasks_per_batch``
episodes -> optimizer step at the scheduled lr; per epoch: the head's ``decay()``, validation on
fixed val episodes, ``best.pt`` / ``last.pt`` / ``metrics.csv``, early stopping.

The recipes (``paper``, ``fast``), ``TrainConfig``, the optimizer, the lr schedule and the
early-stopping rule live in align/recipes.py; opening a new or resumed run folder in
align/run_open.py; this module runs the loop on them.

Every random choice of episode ``i`` (classes, videos, views, dropout mask) is a function of
(seed, i), and ``last.pt`` holds the optimizer, the scheduler, the RNG state, the position inside
the epoch and any accumulated gradients, so ``--resume`` continues bit for bit where a killed or
interrupted (Ctrl-C) run stopped. Checkpoints are written atomically (temp file + os.replace).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from align.checkpoints import (
    save_head,
)
from align.episodes import EpisodeSampler, Stream
from align.evaluate import autocast, compact_attrs, run_episodes, score
from align.feed import Feeder
from align.recipes import (
    TrainConfig,
    describe_recipe,
    early_stop,
    learning_rate,
    make_optimizer,
    set_lr,
    steps_per_epoch,
)
from align.run_open import head_config_of, open_run
from align.runs import (
    remember_run,
    write_metrics,
)
from cache import FeatureCache, UserError
from cache.atomic import write_json
from cache.features import feature_fingerprint
from cache.paths import claim_folder, remove_if_unused, writer_lock
from cache.store import human_bytes

# Peak memory of one training episode / the bytes of its input maps (float32), measured with
# bench/heads_step.py (5-way 5-shot, C=2048): sizes the automatic micro-batch on a GPU.
EPISODE_MEMORY_FACTOR = 6.0

def input_dropout(maps: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Dropout on the backbone maps with a mask drawn from ``seed`` (no global RNG)."""
    if p <= 0:
        return maps
    gen = torch.Generator(device=maps.device).manual_seed(seed)
    keep = torch.rand(maps.shape, generator=gen, device=maps.device) >= p  # (n, C, T, H, W)
    return maps * keep / (1 - p)


def episode_seed(seed: int, index: int) -> int:
    return int(np.random.default_rng([seed, Stream.DROPOUT, index]).integers(2**62))


def validate(head, feeder, episodes, cfg: TrainConfig, device,
             progress: bool, log=None) -> tuple[float, float]:
    """Accuracy (percent) and 95% CI on the fixed validation episodes."""
    preds = run_episodes(head, feeder, episodes, device=device, batch_episodes=cfg.batch_episodes,
                         amp=cfg.amp, desc="validate", progress=progress, log=log)
    result = score(episodes, preds, feeder.cache.classes)
    return result["accuracy"], result["ci95"]


def micro_batch_size(cfg: TrainConfig, device: torch.device, episode_bytes: int
                     ) -> tuple[int, str]:
    """Training episodes per forward / backward pass, and why. Auto: on a GPU as many as fit
    in half its free memory (EPISODE_MEMORY_FACTOR x the input bytes each), up to
    tasks_per_batch; on the CPU 1 (batching does not pay there, see docs/performance.md)."""
    if cfg.micro_batch:
        size = min(cfg.micro_batch, cfg.tasks_per_batch)
        return size, f"micro-batch {size} (as asked)"
    if device.type != "cuda":
        return 1, "micro-batch auto -> 1 on the CPU"
    free = torch.cuda.mem_get_info(device)[0]
    fit = int(0.5 * free // (EPISODE_MEMORY_FACTOR * episode_bytes))
    size = max(1, min(cfg.tasks_per_batch, fit))
    return size, (f"micro-batch auto -> {size}: episodes of ~{human_bytes(episode_bytes)} input "
                  f"each in half of {human_bytes(free)} free GPU memory, at most "
                  f"--tasks-per-batch {cfg.tasks_per_batch}")


def micro_batches(indices: range, epoch_start: int, tasks_per_batch: int, size: int):
    """Consecutive groups of at most ``size`` episode indices that never straddle an SGD step
    (steps fall every tasks_per_batch episodes from the epoch's start)."""
    group: list[int] = []
    for index in indices:
        group.append(index)
        if len(group) == size or (index - epoch_start + 1) % tasks_per_batch == 0:
            yield group
            group = []
    if group:
        yield group


def train_step(head, maps: torch.Tensor, n_support: int, targets: torch.Tensor,
               cfg: TrainConfig, device: torch.device) -> tuple[list[float], list[int]]:
    """Forward and backward of a micro-batch of episodes, maps (E, S+M, C, T, H, W): the
    cross-entropy summed over each episode's queries, divided by tasks_per_batch, accumulated
    into the gradients. Returns each episode's loss and number of correct queries."""
    with autocast(device, cfg.amp):
        logits = head.forward_episodes(maps[:, :n_support], maps[:, n_support:], cfg.way,
                                       cfg.shot)  # (E, M, way)
    episodes = logits.shape[0]
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.repeat(episodes),
                             reduction="none").view(episodes, -1).sum(1)  # (E,)
    (losses.sum() / cfg.tasks_per_batch).backward()
    correct = (logits.argmax(-1) == targets).sum(1)  # (E,)
    return losses.tolist(), correct.tolist()


class StopFlag:
    """Ctrl-C sets a flag the loop checks after every episode; a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def new_stats() -> dict:
    return {"loss": 0.0, "correct": 0, "queries": 0, "time": 0.0}


def check_finite(losses: list[float], group: list[int], epoch: int, run_dir: Path) -> None:
    """Stop at the first non-finite loss: the weights after it would be garbage, and best.pt /
    last.pt still hold the last good epoch."""
    for index, loss in zip(group, losses):
        if not math.isfinite(loss):
            raise UserError(f"training diverged at epoch {epoch + 1}, episode {index}: the loss "
                            f"is {loss}; {run_dir} keeps the last good epoch (lower --lr or "
                            "--dropout)")


def check_finite_weights(params: list[torch.Tensor], epoch: int, done: int,
                         run_dir: Path) -> None:
    """Stop when an optimizer step leaves a non-finite weight (a NaN learning rate, an
    overflow): nothing after it could be trusted, nor saved."""
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise UserError(f"training diverged at epoch {epoch + 1}, episode {done}: an optimizer "
                        f"step made the weights non-finite; {run_dir} keeps the last good epoch")


def metrics_row(epoch: int, lr: float, stats: dict, episodes: int, val: tuple,
                best: float) -> dict:
    val_acc, val_ci = val
    return {"epoch": epoch, "lr": lr, "train_loss": round(stats["loss"] / episodes, 5),
            "train_acc": round(100 * stats["correct"] / max(1, stats["queries"]), 3),
            "val_acc": None if val_acc is None else round(val_acc, 3),
            "val_ci95": None if val_ci is None else round(val_ci, 3),
            "best_val_acc": round(best, 3) if best >= 0 else None,
            "epoch_time_s": round(stats["time"], 3),
            "episodes_per_s": round(episodes / stats["time"], 3) if stats["time"] else None}


def episode_requests(episodes):
    """(rows, views) per episode: support then query, as the feeder serves them."""
    for e in episodes:
        views = (None if e.support_views is None
                 else np.concatenate([e.support_views, e.query_views]))
        yield np.concatenate([e.support, e.query]), views


# ------------------------------------------------------------------------------ the loop
def train(cfg: TrainConfig | None = None, *, device: torch.device, resume: str | None = None,
          log: Callable[[str], None] = print, progress: bool = True,
          on_episode: Callable[[int, int], None] | None = None) -> dict:
    """Train a head episodically on ``cfg.cache`` (or continue the run in ``resume``).

    ``on_episode(epoch, episode)`` is called after every training episode (tests use it to
    interrupt a run). Returns a summary dict (run dir, best val accuracy, epochs done ...).
    The run folder has one writer (a lock; a second run into it is refused) and is one this
    command made (a new or empty folder, or a run of its own); a run that fails before writing
    anything leaves no empty folder behind.
    """
    # the run: config (with the dataset's recipe), cache, directory, head (restored on resume)
    requested, cfg, cache, run_dir, head, state = open_run(cfg, resume, log)
    with writer_lock(run_dir, what="train-heads"):
        if state is None and (run_dir / "last.pt").exists():  # finished while we waited
            raise UserError(f"{run_dir} already holds a run: pass --resume {run_dir} or "
                            "another --out")
        created = claim_folder(run_dir, "train-heads", "--out",
                               legacy=lambda folder: state is not None or _sweep_made(folder))
        try:
            return _train_run(requested, cfg, cache, run_dir, head, state, device=device,
                              log=log, progress=progress, on_episode=on_episode)
        finally:
            if created:
                remove_if_unused(run_dir)


def _sweep_made(folder: Path) -> bool:
    """A run folder a sweep from before folder markers made: it holds only its request."""
    return {entry.name for entry in folder.iterdir()} <= {"sweep-run.json"}


def _train_run(requested: TrainConfig, cfg: TrainConfig, cache: FeatureCache, run_dir: Path,
               head, state: dict | None, *, device: torch.device, log, progress: bool,
               on_episode) -> dict:
    """The loop of ``train`` on an opened run (its folder locked)."""
    features = feature_fingerprint(cache.attrs, cache.path)  # what the head is trained on
    head = head.to(device).train()
    if cfg.compile:
        head.compile_entry_points()
    params = [p for p in head.parameters() if p.requires_grad]
    if not params:
        log(f"{cfg.head} has no trainable parameters here: nothing to train, validating once")
    epochs = cfg.epochs if params else 0

    # the recipe's optimizer; its lr is set before every step from learning_rate(cfg, step)
    optimizer = make_optimizer(params, cfg)
    log(f"recipe {cfg.recipe}: {describe_recipe(cfg)}")

    # episodes: training draws from `train` (random aug views when cached), selection on `val`
    sampler = EpisodeSampler(cache, "train", way=cfg.way, shot=cfg.shot, queries=cfg.queries,
                             seed=cfg.seed, stream=Stream.TRAIN,
                             aug_views=cache.aug_views if cache.has_aug else 0)
    feeder = Feeder(cache, "train", device=device, preload=cfg.preload, aug=cache.has_aug,
                    workers=cfg.workers, progress=progress)
    log(f"train  {feeder.reason}" + (f"; random views of {cache.aug_views}" if feeder.aug else ""))
    val_episodes, val_feeder = [], None
    if cfg.val_episodes > 0:
        val_episodes = EpisodeSampler(cache, "val", way=cfg.way, shot=cfg.shot,
                                      queries=cfg.val_queries, seed=cfg.seed,
                                      stream=Stream.VAL).episodes(0, cfg.val_episodes)
        val_feeder = Feeder(cache, "val", device=device, preload=cfg.preload,
                            workers=cfg.workers, progress=progress)

    # the run directory says how it was made; runs/latest.json lets `evaluate` find it
    write_json(run_dir / "config.json", {"requested": asdict(requested), "train": asdict(cfg),
                                         "head": head_config_of(head),
                                         "device": str(device),
                                         "features": features,
                                         "cache_attrs": compact_attrs(cache.attrs)})
    remember_run({"run": str(run_dir), "checkpoint": str(run_dir / "best.pt"),
                  "cache": cfg.cache, "head": cfg.head, "way": cfg.way, "shot": cfg.shot,
                  "dataset": cfg.dataset})

    # restore a resumed run's position, optimizer, RNG and accumulated gradients
    start_epoch, start_episode, history, best, stats = 0, 0, [], -1.0, new_stats()
    if state is not None:
        start_epoch, start_episode = state["epoch"], state["episode"]
        history, best, stats = state["history"], state["best_val_acc"], state["stats"]
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        for p, g in zip(params, state["grads"] or []):
            p.grad = None if g is None else g.to(device)

    def checkpoint(name: str, epoch: int, episode: int) -> None:
        grads = [None if p.grad is None else p.grad.detach().cpu() for p in params]
        save_head(head, run_dir / name, extra={
            "epoch": epoch, "episode": episode, "history": history, "best_val_acc": best,
            "stats": dict(stats), "optimizer": optimizer.state_dict(),
            "grads": grads if episode else None,
            "rng": {"torch": torch.get_rng_state()}, "config": asdict(cfg),
            "features": features})

    per_epoch, n_support, spe = cfg.episodes_per_epoch, cfg.way * cfg.shot, steps_per_epoch(cfg)
    targets = torch.arange(cfg.way, device=device).repeat_interleave(cfg.queries)  # (M,)
    episode_bytes = (n_support + len(targets)) * int(np.prod(cache.shape)) * 4
    micro, why = micro_batch_size(cfg, device, episode_bytes)
    if epochs:
        log(f"train  {why}")
    said: list[str] = []

    def log_once(message: str) -> None:  # where validation keeps its per-video states
        if not said:
            said.append(message)
            log(message)

    bar = tqdm(total=epochs * per_epoch, initial=start_epoch * per_epoch + start_episode,
               desc=f"train {cfg.head}", unit="ep", disable=not progress)
    stopped = None
    with StopFlag() as stop:
        for epoch in range(start_epoch, epochs):
            # early stopping: `patience` validations without a new best (a resumed run too)
            stopped = early_stop(cfg, history, best)
            if stopped:
                log(stopped)
                break
            first = epoch * per_epoch + (start_episode if epoch == start_epoch else 0)
            indices = range(first, (epoch + 1) * per_epoch)
            episodes = [sampler.episode(i) for i in indices]
            stream = feeder.stream(episode_requests(episodes))
            tick = time.perf_counter()
            for group in micro_batches(indices, epoch * per_epoch, cfg.tasks_per_batch, micro):
                # dropout on each episode's input maps, then one forward + backward of the group
                maps = torch.stack([input_dropout(next(stream), cfg.dropout,
                                                  episode_seed(cfg.seed, index))
                                    for index in group])  # (E, S+M, C, T, H, W)
                losses, right = train_step(head, maps, n_support, targets, cfg, device)
                check_finite(losses, group, epoch, run_dir)
                for index, loss, correct in zip(group, losses, right):
                    # an optimizer step every tasks_per_batch episodes, and at the end of the epoch
                    done = index - epoch * per_epoch + 1
                    if done % cfg.tasks_per_batch == 0 or done == per_epoch:
                        step = epoch * spe + (done - 1) // cfg.tasks_per_batch
                        lr = set_lr(optimizer, learning_rate(cfg, step))
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        check_finite_weights(params, epoch, done, run_dir)
                    # running statistics for the progress bar and metrics.csv
                    stats["loss"] += loss
                    stats["correct"] += correct
                    stats["queries"] += len(targets)
                    bar.update()
                    bar.set_postfix(epoch=epoch + 1, loss=f"{stats['loss'] / done:.3f}",
                                    acc=f"{100 * stats['correct'] / stats['queries']:.1f}")
                    if on_episode is not None:
                        on_episode(epoch, done)
                # Ctrl-C mid-epoch: keep everything needed to continue from the next episode
                if stop.requested and done < per_epoch:
                    stats["time"] += time.perf_counter() - tick
                    checkpoint("last.pt", epoch, done)
                    bar.close()
                    return _summary(run_dir, cfg, history, best, interrupted=True)
            stats["time"] += time.perf_counter() - tick
            # end of epoch: the SC perturbation's decay, validation
            if (epoch + 1) % cfg.decay_every == 0:
                head.decay()
            val = (None, None)
            if val_feeder is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == epochs):
                val = validate(head, val_feeder, val_episodes, cfg, device, progress, log_once)
                log(f"epoch {epoch + 1}: val {val[0]:.2f} +- {val[1]:.2f} "
                    f"(best {max(best, val[0]):.2f})")
            # best.pt by validation accuracy (without validation: the latest epoch)
            if val_feeder is None or (val[0] is not None and val[0] > best):
                best = best if val[0] is None else val[0]
                save_head(head, run_dir / "best.pt", extra={
                    "epoch": epoch + 1, "val_acc": val[0], "val_ci95": val[1],
                    "config": asdict(cfg), "features": features})
            # metrics.csv and last.pt at a clean epoch boundary (no pending gradients)
            history.append(metrics_row(epoch + 1, lr, stats, per_epoch, val, best))
            write_metrics(run_dir / "metrics.csv", history)
            stats = new_stats()
            checkpoint("last.pt", epoch + 1, 0)
            if stop.requested:
                bar.close()
                return _summary(run_dir, cfg, history, best, interrupted=True)
    bar.close()

    # nothing to train (a training-free head): validate once so best.pt says how good it is
    if epochs == 0:
        val = (validate(head, val_feeder, val_episodes, cfg, device, progress)
               if val_feeder is not None else (None, None))
        best = best if val[0] is None else val[0]
        save_head(head, run_dir / "best.pt", extra={"epoch": 0, "val_acc": val[0],
                                                    "val_ci95": val[1], "config": asdict(cfg),
                                                    "features": features})
        checkpoint("last.pt", 0, 0)
        stopped = "nothing to train: validated once"
    return _summary(run_dir, cfg, history, best, interrupted=False, stopped=stopped)


def _summary(run_dir: Path, cfg: TrainConfig, history: list[dict], best: float,
             interrupted: bool, stopped: str | None = None) -> dict:
    if stopped is None and not interrupted:
        stopped = f"the budget of {cfg.epochs} epochs is done"
    return {"run": str(run_dir), "best": str(run_dir / "best.pt"), "epochs_done": len(history),
            "epochs": cfg.epochs, "best_val_acc": best if best >= 0 else None,
            "interrupted": interrupted, "stopped": stopped, "history": history,
            "config": asdict(cfg)}


def format_summary(summary: dict) -> str:
    """What `train-heads` prints at the end."""
    cfg = summary["config"]
    best = summary["best_val_acc"]
    lines = [f"run        {summary['run']}",
             f"trained    {summary['epochs_done']}/{summary['epochs']} epochs of "
             f"{cfg['episodes_per_epoch']} episodes ({cfg['way']}-way {cfg['shot']}-shot)",
             f"best val   {best:.2f}" if best is not None else "best val   (no validation)",
             f"checkpoint {summary['best']}"]
    if summary["stopped"]:
        lines.append(f"stopped    {summary['stopped']}")
    if summary["interrupted"]:
        lines.append(f"interrupted: saved last.pt; continue with `python cli.py train-heads "
                     f"--resume {summary['run']}`")
    return "\n".join(lines)

