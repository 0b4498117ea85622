"""The run-directory contract, and the one resolver every phase-two command uses to find its head.

A run directory (``train-heads --out``, default ``runs/<dataset>-<head>-<K>shot-<time>/``) holds:

    config.json   {"requested": the options as given, "train": the resolved TrainConfig,
                   "head": HeadConfig, "device", "cache_attrs"}
    metrics.csv   one line per epoch (METRIC_FIELDS)
    best.pt       the head with the best validation accuracy (align/checkpoints.py format)
    last.pt       the latest epoch's head plus optimizer, scheduler, RNG and position (resume)

and ``runs/latest.json`` names the most recent run, so `evaluate`, `visualize` and `analyze`
need no arguments after `train-heads`. ``resolve_head_source`` turns "a checkpoint, a
training-free head, or nothing (the latest run)" plus optional cache / K into one
``HeadSource``; ``load_head_source`` builds the head it names on a cache.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from align.checkpoints import load_head_checkpoint
from align.episodes import episode_header, read_episode_file
from align.models import Head, build_head, head_class
from align.options import DEFAULT_SHOT, DEFAULT_WAY
from cache import FeatureCache, UserError
from cache.atomic import atomic_path, write_json
from cache.features import check_same_features, feature_fingerprint
from cache.latest import resolve_cache

RUNS_ROOT = Path("runs")
LATEST_RUN = RUNS_ROOT / "latest.json"
METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_acc", "val_ci95", "best_val_acc",
                 "epoch_time_s", "episodes_per_s")


# ------------------------------------------------------------------------------ the directory
def default_run_dir(dataset: str, head: str, shot: int) -> Path:
    return RUNS_ROOT / f"{dataset}-{head}-{shot}shot-{time.strftime('%Y%m%d-%H%M%S')}"


def write_metrics(path: str | os.PathLike, history: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a run's metrics.csv with numbers as floats (None where empty)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (float(v) if v not in ("", None, "None") else None) for k, v in r.items()}
            for r in rows]


def remember_run(record: dict) -> None:
    """runs/latest.json: the run that commands given no --checkpoint use."""
    write_json(LATEST_RUN, record)


def latest_run(alternatives: str = "--checkpoint or --head") -> dict:
    """runs/latest.json's record; ``alternatives`` names the options the command offers instead."""
    if not LATEST_RUN.exists():
        raise UserError("no --checkpoint given and no run trained yet: run "
                        f"`python cli.py train-heads` first, or pass {alternatives}")
    try:
        record = json.loads(LATEST_RUN.read_text())
        record["checkpoint"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{LATEST_RUN} is damaged ({exc}); pass --checkpoint") from None
    return record


def run_config(checkpoint: str | os.PathLike) -> dict:
    """config.json of the run directory that holds ``checkpoint`` ({} for a lone file)."""
    path = Path(checkpoint).parent / "config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def episode_file_header(path: str) -> dict:
    """split, way, shot, queries of a saved episode file (``evaluate --save-episodes``)."""
    header = episode_header(read_episode_file(path), path)
    return {k: header[k] for k in ("split", "way", "shot", "queries")}


# ------------------------------------------------------------------------------ the resolver
@dataclass
class HeadSource:
    """Where a command's head comes from, with every default resolved.

    Args:
        checkpoint: a head checkpoint (None: ``kind`` is built fresh).
        kind: the head to build when there is no checkpoint.
        cache: the feature cache to run on.
        shot: K of the episodes (and of the head).
        way: N of the episodes.
        train: the training config of the checkpoint's run ({} when unknown).
    """

    checkpoint: str | None
    kind: str | None
    cache: str
    shot: int
    train: dict = field(default_factory=dict)
    way: int = DEFAULT_WAY


def resolve_head_source(*, checkpoint: str | None = None, kind: str | None = None,
                        cache: str | None = None, shot: int | None = None,
                        way: int | None = None, episodes_from: str | None = None,
                        head_option: bool = True, log=print) -> HeadSource:
    """Fill in what the user left out, saying which: no checkpoint and no ``kind`` -> the latest
    run's best.pt; no cache -> the run's, else the most recently written one; K (and N) -> the
    episode file's, else the one asked for, else the run's, else ``DEFAULT_SHOT`` (``DEFAULT_WAY``).
    ``head_option``: whether the command offers --head (named in the no-run error)."""
    if checkpoint and kind:
        raise UserError("give --checkpoint or --head, not both")
    latest = {}
    if checkpoint is None and kind is None:
        latest = latest_run("--checkpoint or --head" if head_option else "--checkpoint")
        checkpoint = latest["checkpoint"]
        log(f"checkpoint {checkpoint} (best.pt of the most recent run)")
    train = {}
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise UserError(f"no checkpoint at {checkpoint}" + (
                " (the run has not validated yet)" if latest else ""))
        train = run_config(checkpoint).get("train", {})
    run_cache = latest.get("cache") or train.get("cache")
    if cache is None and run_cache is not None:
        cache = run_cache
        log(f"cache      {cache} (the run's)")
    else:
        cache = resolve_cache(cache, log, label="cache      ")
    if episodes_from:
        header = episode_file_header(episodes_from)
        shot, way = int(header["shot"]), int(header["way"])
    shot = shot or latest.get("shot") or train.get("shot") or DEFAULT_SHOT
    way = way or latest.get("way") or train.get("way") or DEFAULT_WAY
    return HeadSource(checkpoint=checkpoint, kind=kind, cache=cache, shot=int(shot), train=train,
                      way=int(way))


def load_head_source(source: HeadSource, cache: FeatureCache, *, seed: int = 0,
                     untrained: bool = False, allow_other_features: bool = False,
                     log=print) -> tuple[Head, dict | None]:
    """(head, checkpoint facts) for ``source`` on ``cache``, checked to fit its maps.

    A checkpoint loads with K = ``source.shot`` (the authors' files, which record neither T nor
    H, W, get the cache's); a ``kind`` must be training-free unless ``untrained`` is allowed
    (analyze embedding's "before training" view). A checkpoint trained on other features than
    the cache's is refused unless ``allow_other_features`` (then a warning is logged);
    ``facts["features"]`` records the check (trained_on, scored_on, warning)."""
    c, t, h, w = cache.shape
    facts = None
    if source.checkpoint is not None:
        head, extra = load_head_checkpoint(source.checkpoint, map_location="cpu",
                                           shot=source.shot)
        if extra.get("source") == "authors":  # their files do not record T, H, W
            head, extra = load_head_checkpoint(source.checkpoint, map_location="cpu",
                                               shot=source.shot, frames=t, height=h, width=w)
        scored_on = feature_fingerprint(cache.attrs, cache.path)
        warning = check_same_features(extra.get("features"), scored_on,
                                      what=f"checkpoint {source.checkpoint}",
                                      allow_other=allow_other_features)
        if warning:
            log(warning)
        facts = {"run": run_config(source.checkpoint),
                 "features": {"trained_on": extra.get("features"), "scored_on": scored_on,
                              "warning": warning},
                 **{k: extra[k] for k in ("epoch", "val_acc", "val_ci95", "source", "iteration")
                    if k in extra}}
    elif head_class(source.kind).training_free or untrained:
        head = build_head(source.kind, channels=c, frames=t, height=h, width=w,
                          shot=source.shot, seed=seed)
    else:
        raise UserError(f"--head {source.kind} has trainable parameters: pass --checkpoint "
                        f"(train one with `python cli.py train-heads --head {source.kind}`)")
    check_head_fits(asdict(head.config), cache)
    return head, facts


def check_head_fits(head_config: dict, cache: FeatureCache) -> None:
    """Refuse a cache whose (C, T, H, W) differs from what the head was built for."""
    c, t, h, w = cache.shape
    expected = {"channels": c, "frames": t, "height": h, "width": w}
    wrong = {k: (head_config[k], v) for k, v in expected.items()
             if head_config.get(k) is not None and int(head_config[k]) != v}
    if wrong:
        detail = ", ".join(f"{k} {a} (head) vs {b} (cache)" for k, (a, b) in wrong.items())
        raise UserError(f"{cache.path}: features do not match the head: {detail}")
