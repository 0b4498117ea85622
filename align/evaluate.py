"""Evaluation: test episodes -> accuracy with its 95% confidence interval, per-class accuracy,
confusion matrix and a JSON report that says how every number was made.

The interval is the paper's (and the authors' code's): 1.96 x std / sqrt(episodes), over the
per-episode accuracies (std with ddof=0). Evaluation is embarrassingly parallel: heads that offer
``forward_episodes`` get many episodes per forward pass.

``run_episodes`` is shared with training's validation. ``evaluate_command`` is `python cli.py
evaluate`: it resolves the defaults (the latest run's best.pt, recorded in runs/latest.json by
training, on that run's cache and shots) and says which it used.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from align.episodes import Episode, EpisodeSampler, Stream, load_episodes, save_episodes
from align.feed import Feeder
from align.runs import RUNS_ROOT, load_head_source, resolve_head_source
from cache import FeatureCache, UserError
from cache.atomic import write_json

PER_ROW_ATTRS = ("windows", "positions", "exponents")  # synthetic ground truth, one per row


@dataclass
class EvalConfig:
    """One evaluation.

    Args:
        split: the split whose episodes are scored ("test" reports, "val" selects).
        way, shot, queries: N-way K-shot with Q queries per class (the authors: Q = 1).
        episodes: number of episodes (the paper: 5000).
        seed: draws the episodes.
        batch_episodes: episodes per forward pass for heads with ``forward_episodes``.
        preload, workers: how rows reach the device (see align/feed.py).
        amp: bfloat16 autocast on CUDA.
        episodes_from: replay this episode file instead of sampling (its split/way/shot win).
        save_episodes: write the episodes scored to this file.
    """

    split: str = "test"
    way: int = 5
    shot: int = 1
    queries: int = 1
    episodes: int = 5000
    seed: int = 0
    batch_episodes: int = 16
    preload: str = "auto"
    workers: int = 4
    amp: bool = True
    episodes_from: str | None = None
    save_episodes: str | None = None


# ------------------------------------------------------------------------------ running episodes
def autocast(device: torch.device, amp: bool):
    """bfloat16 autocast on CUDA when asked; a no-op context elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def _episode_logits(head, stacked: torch.Tensor, batch: list[Episode]) -> torch.Tensor:
    """(E, M, way) logits of ``len(batch)`` episodes whose rows are stacked support-then-query."""
    way, shot = batch[0].way, batch[0].shot
    n_support, n_query = way * shot, len(batch[0].query)
    maps = stacked.view(len(batch), n_support + n_query, *stacked.shape[1:])  # (E, S+M, C, T, H, W)
    support, query = maps[:, :n_support], maps[:, n_support:]  # (E, S, ...), (E, M, ...)
    return head.forward_episodes(support, query, way, shot)  # (E, M, way)


def run_episodes(head, feeder: Feeder, episodes: list[Episode], *, device: torch.device,
                 batch_episodes: int = 16, amp: bool = True, desc: str = "evaluate",
                 progress: bool = True) -> np.ndarray:
    """(E, way * queries) episode-local predictions of ``head`` (in eval mode) for ``episodes``."""
    shapes = {(e.way, e.shot, len(e.query)) for e in episodes}
    if len(shapes) != 1:
        raise UserError(f"episodes of different shapes (way, shot, queries): {sorted(shapes)}")
    step = max(1, batch_episodes)
    batches = [episodes[i:i + step] for i in range(0, len(episodes), step)]
    requests = ((np.concatenate([np.concatenate([e.support, e.query]) for e in b]), None)
                for b in batches)
    was_training = head.training
    head.eval()
    preds = []
    with torch.inference_mode(), tqdm(total=len(episodes), desc=desc, unit="ep",
                                      disable=not progress, leave=False) as bar:
        for batch, stacked in zip(batches, feeder.stream(requests)):
            with autocast(device, amp):
                logits = _episode_logits(head, stacked, batch)  # (E, M, way)
            preds.append(logits.float().argmax(-1).cpu().numpy())
            bar.update(len(batch))
    head.train(was_training)
    return np.concatenate(preds)


# ------------------------------------------------------------------------------ scoring
def confidence_interval(accuracies: np.ndarray) -> float:
    """The paper's 95% interval of the mean accuracy: 1.96 x std / sqrt(episodes)."""
    accuracies = np.asarray(accuracies, dtype=np.float64)
    return float(1.96 * accuracies.std() / math.sqrt(len(accuracies)))


def score(episodes: list[Episode], preds: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy (percent), CI, per-episode and per-class accuracy, confusion matrix."""
    targets = np.stack([e.query_targets for e in episodes])  # (E, M)
    per_episode = 100.0 * (preds == targets).mean(axis=1)  # (E,)
    true_class = np.stack([e.classes[e.query_targets] for e in episodes])  # (E, M) cache labels
    pred_class = np.stack([e.classes[p] for e, p in zip(episodes, preds)])  # (E, M)
    labels = np.unique(true_class)
    index = {int(c): i for i, c in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(true_class.ravel(), pred_class.ravel()):
        confusion[index[int(t)], index[int(p)]] += 1
    names = [class_names[int(c)] for c in labels]
    per_class = {name: round(100.0 * confusion[i, i] / confusion[i].sum(), 4)
                 for i, name in enumerate(names)}
    return {
        "accuracy": float(per_episode.mean()),
        "ci95": confidence_interval(per_episode),
        "per_class_accuracy": per_class,
        "confusion": {"classes": names, "matrix": confusion.tolist(),
                      "note": "rows: true class, columns: predicted class, counts of queries"},
        "episode_accuracy": [round(float(a), 4) for a in per_episode],
    }


def format_result(way: int, shot: int, split: str, accuracy: float, ci: float,
                  episodes: int) -> str:
    """The paper's format: ``5-way 5-shot test: 89.63 +- 0.27 (5000 episodes)``."""
    return f"{way}-way {shot}-shot {split}: {accuracy:.2f} +- {ci:.2f} ({episodes} episodes)"


def compact_attrs(attrs: dict) -> dict:
    """Cache attributes for reports and run configs, without per-row ground-truth lists."""
    attrs = dict(attrs)
    if isinstance(attrs.get("synthetic"), dict):
        attrs["synthetic"] = {k: v for k, v in attrs["synthetic"].items()
                              if k not in PER_ROW_ATTRS}
    return attrs


# ------------------------------------------------------------------------------ evaluate
def evaluate(head, cache: FeatureCache, cfg: EvalConfig, *, device: torch.device,
             head_config: dict | None = None, checkpoint: str | None = None,
             checkpoint_config: dict | None = None, report: str | None = None,
             progress: bool = True, log=None) -> dict:
    """Score ``head`` on ``cfg.episodes`` episodes of ``cache``; write and return the report."""
    start = time.perf_counter()
    if cfg.episodes_from:
        episodes, header = load_episodes(cfg.episodes_from, cache)
        cfg.split, cfg.seed = header["split"], header["seed"]
        cfg.way, cfg.shot, cfg.queries = header["way"], header["shot"], header["queries"]
        cfg.episodes = len(episodes)
    else:
        sampler = EpisodeSampler(cache, cfg.split, way=cfg.way, shot=cfg.shot,
                                 queries=cfg.queries, seed=cfg.seed, stream=Stream.TEST)
        episodes = sampler.episodes(0, cfg.episodes)
    if cfg.save_episodes:
        save_episodes(cfg.save_episodes, episodes, cache, split=cfg.split, seed=cfg.seed)
    feeder = Feeder(cache, cfg.split, device=device, preload=cfg.preload, workers=cfg.workers,
                    progress=progress)
    if log is not None:
        log(f"{cfg.split:<6} {feeder.reason}")
    head = head.to(device)
    loop_start = time.perf_counter()
    preds = run_episodes(head, feeder, episodes, device=device, amp=cfg.amp,
                         batch_episodes=cfg.batch_episodes, progress=progress)
    loop_time = time.perf_counter() - loop_start
    result = score(episodes, preds, cache.classes)
    summary = format_result(cfg.way, cfg.shot, cfg.split, result["accuracy"], result["ci95"],
                            len(episodes))
    out = {
        "summary": summary,
        **{k: result[k] for k in ("accuracy", "ci95")},
        "episodes": len(episodes),
        **{k: v for k, v in asdict(cfg).items() if k != "episodes"},
        "device": str(device),
        "preload": feeder.reason,
        "head": head_config,
        "checkpoint": checkpoint,
        "checkpoint_config": checkpoint_config,
        "cache": {"path": cache.path, "shape": list(cache.shape),
                  "attrs": compact_attrs(cache.attrs)},
        "wall_time_s": round(time.perf_counter() - start, 3),
        "episode_time_s": round(loop_time, 3),
        "episodes_per_s": round(len(episodes) / loop_time, 3) if loop_time > 0 else None,
        **{k: result[k] for k in ("per_class_accuracy", "confusion", "episode_accuracy")},
    }
    if report:
        out["report"] = str(report)
        write_json(report, out)
    return out


# ------------------------------------------------------------------------------ the command
def evaluate_command(cfg: EvalConfig, *, checkpoint: str | None, head_kind: str | None,
                     cache_path: str | None, shot: int | None, device: torch.device,
                     report: str | None, log=print, progress: bool = True) -> dict:
    """`python cli.py evaluate`: resolve the defaults (and say which), load the head, evaluate.

    With neither ``checkpoint`` nor ``head_kind``, the most recent run's best.pt on that run's
    cache and shots; a training-free ``head_kind`` (protonet, otam) needs no checkpoint.
    """
    source = resolve_head_source(checkpoint=checkpoint, kind=head_kind, cache=cache_path,
                                 shot=shot, episodes_from=cfg.episodes_from, log=log)
    cfg.shot = source.shot
    with FeatureCache.open(source.cache) as cache:
        head, facts = load_head_source(source, cache)
        head_config = asdict(head.config)
        if report is None:
            report = default_report_path(cfg, source.checkpoint, head.kind,
                                         cache.attrs.get("dataset", "cache"))
        return evaluate(head, cache, cfg, device=device, head_config=head_config,
                        checkpoint=source.checkpoint, checkpoint_config=facts,
                        report=report, progress=progress, log=log)


def default_report_path(cfg: EvalConfig, checkpoint: str | None, kind: str, dataset: str) -> str:
    """Next to the checkpoint, or under runs/ for a training-free head."""
    name = f"{cfg.split}-{cfg.way}way-{cfg.shot}shot-{cfg.episodes}ep-seed{cfg.seed}"
    if cfg.episodes_from:
        name = f"{cfg.split}-{Path(cfg.episodes_from).stem}"
    if checkpoint is not None:
        return str(Path(checkpoint).parent / f"eval-{Path(checkpoint).stem}-{name}.json")
    return str(RUNS_ROOT / f"eval-{dataset}-{kind}-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
