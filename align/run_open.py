"""Opening a training run: a new run folder, or the one ``--resume`` names.

``open_run`` resolves the cache and the recipe and builds the head (or loads last.pt); a resumed
run continues what its last.pt holds, and ``resumed_config`` refuses a config.json that disagrees
with it. align/train.py runs the loop on what ``open_run`` returns.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from align.checkpoints import (
    CHECKPOINT_VERSION,
    TA2N_SWITCHES,
    load_head_checkpoint,
    upgrade_config,
)
from align.models import build_head
from align.recipes import TrainConfig
from align.runs import check_head_fits, default_run_dir
from cache import FeatureCache, UserError
from cache.features import check_same_features, feature_fingerprint
from cache.latest import resolve_cache
from cache.paths import check_writable


def head_config_of(head) -> dict:
    return asdict(head.config)


def open_run(cfg: TrainConfig | None, resume: str | None, log) -> tuple:
    """(requested, cfg, cache, run_dir, head, state): a new run, or the one in ``resume`` with
    its last.pt (head weights, SC step and BatchNorm statistics included) and training state.
    ``requested`` is the config as asked for; ``cfg`` is a new object, resolved (cache, recipe,
    dataset, run directory filled in). A resumed run trains what its last.pt holds: a
    config.json that disagrees with it, or a cache of other features, is refused."""
    state = None
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "last.pt").exists():
            raise UserError(f"{resume} holds no last.pt to resume from")
        head, state = load_head_checkpoint(run_dir / "last.pt", map_location="cpu")
        cfg, requested = resumed_config(run_dir, state, head_config_of(head))
        log(f"resuming {run_dir} at epoch {state['epoch'] + 1}, episode {state['episode']}")
    else:
        requested = cfg
    cfg = replace(cfg, cache=resolve_cache(cfg.cache, log))
    cache = FeatureCache.open(cfg.cache)
    cfg, notes = cfg.resolve(cache.attrs.get("dataset", "unknown"))
    for note in notes:
        log(note)
    run_dir = Path(cfg.out or default_run_dir(cfg.dataset, cfg.head, cfg.shot))
    if state is None:
        if (run_dir / "last.pt").exists():
            raise UserError(f"{run_dir} already holds a run: pass --resume {run_dir} or "
                            "another --out")
        c, t, h, w = cache.shape
        head = build_head(cfg.head, channels=c, frames=t, height=h, width=w, shot=cfg.shot,
                          seed=cfg.seed, options=cfg.head_options)
    check_head_fits(head_config_of(head), cache)
    if state is not None:
        warning = check_same_features(state.get("features"),
                                      feature_fingerprint(cache.attrs, cache.path),
                                      what=f"the run {run_dir}",
                                      remedy="start a new run with --out")
        if warning:  # a last.pt from before fingerprints: nothing to compare with
            log(warning)
    check_writable(run_dir, "folder", "the run directory (--out)")
    return requested, replace(cfg, out=str(run_dir)), cache, run_dir, head, state


def resumed_config(run_dir: Path, state: dict, head_config: dict
                   ) -> tuple[TrainConfig, TrainConfig]:
    """(the config to continue with, the request) of a run being resumed. last.pt's own config
    is the truth; config.json must agree with it field by field (an edited file would make the
    progress bar, config.json and runs/latest.json say one thing while another is trained)."""
    saved = read_run_config(run_dir)
    train_saved = saved.get("train")
    if not isinstance(train_saved, dict):
        raise UserError(f"{run_dir}/config.json has no 'train' section; restore it")
    truth = state.get("config")
    if not isinstance(truth, dict):  # a last.pt from before checkpoints recorded their config
        truth = train_saved
    requested_saved = saved.get("requested", train_saved)
    if not isinstance(requested_saved, dict):
        raise UserError(f"{run_dir}/config.json: 'requested' must be an object; restore it")
    ignore = {"out", "cache", "dataset"}  # the folder may have moved; the cache is checked apart
    for section, values, only_set in (("train", train_saved, False),
                                      ("requested", requested_saved, True)):
        for key, value in values.items():
            if key in ignore or key not in truth or (only_set and value is None):
                continue
            if value != truth[key]:
                raise UserError(f"{run_dir}/config.json says {section}.{key} = {value!r}, but "
                                f"last.pt was trained with {key} = {truth[key]!r}; the "
                                "checkpoint is what would be trained: restore config.json, or "
                                "start a new run with --out")
    head_saved = saved.get("head")
    if isinstance(head_saved, dict):  # a run's config.json records no checkpoint version
        old_layout = any(k in head_saved for k in TA2N_SWITCHES)
        head_saved = upgrade_config(head_saved, 2 if old_layout else CHECKPOINT_VERSION)
        for key, value in head_saved.items():
            if key in head_config and value != head_config[key]:
                raise UserError(f"{run_dir}/config.json says head.{key} = {value!r}, but last.pt "
                                f"holds a head with {key} = {head_config[key]!r}; restore "
                                "config.json, or start a new run with --out")
    cfg = TrainConfig.from_json(truth, where=f"{run_dir}/last.pt")
    requested = TrainConfig.from_json(requested_saved, where=f"{run_dir}/config.json")
    cfg = replace(cfg, out=str(run_dir), cache=train_saved.get("cache") or truth.get("cache"))
    return cfg, requested


def read_run_config(run_dir: Path) -> dict:
    """config.json of a run folder, as a dict; a missing or damaged file is one line."""
    path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the run cannot be resumed without it (restore "
                        "it, or start a new run with --out)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); restore it, or start a new run "
                        "with --out") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} must hold a JSON object; restore it")
    return saved
