"""A sweep's statistics: per run (the CSV lines) and per row, mean +- std over seeds and
the paired test of each row against its reference (align/stats.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from align.stats import PAIRED_EPISODES, PAIRED_SEEDS, paired_test, seed_spread
from align.sweep.plan import REPORT_FILE, RUN_FILE, RunPlan, SweepConfig, row_keys
from align.sweep.spec import SweepSpec


# ------------------------------------------------------------------------------ statistics
def load_run(plan: RunPlan) -> tuple[dict, dict]:
    """(the run's sweep record result, its evaluation report)."""
    run_dir = Path(plan.run_dir)
    record = json.loads((run_dir / RUN_FILE).read_text())
    report = json.loads((run_dir / REPORT_FILE).read_text())
    return record["result"], report


def summarise(spec: SweepSpec, cfg: SweepConfig, plans: list[RunPlan],
              references: dict[str, str | None], out: Path, cache_path: str) -> dict:
    """Per run (the CSV lines) and per row: per-seed accuracy +- CI, mean +- std over seeds,
    and the paired tests against the row's reference (over episodes, over seeds)."""
    runs, episodes = [], {}
    for plan in plans:
        result, report = load_run(plan)
        runs.append(_csv_line(plan, result, out))
        key = (plan.name, plan.shot)
        episodes.setdefault(key, []).append(np.asarray(report["episode_accuracy"]))  # (E,)
    rows = []
    for run, shot in row_keys(spec, cfg):
        lines = [r for r in runs if (r["run"], r["shot"]) == (run.name, shot)]
        mean, std = seed_spread([r["accuracy"] for r in lines])
        vs = references[run.name]
        rows.append({"run": run.name, "shot": shot, "head": lines[0]["head"],
                     "seeds": [{"seed": r["seed"], "accuracy": r["accuracy"], "ci95": r["ci95"]}
                               for r in lines],
                     "mean": mean, "std": std, "vs": vs,
                     "paired": _paired(episodes, (run.name, shot), vs),
                     **{key: _mean_over_seeds(lines, key)
                        for key in ("episodes_to_best", "train_s_to_best")}})
    return {"title": spec.title, "cache": cache_path, "out": str(out),
            "test": {"split": cfg.split, "way": cfg.way, "queries": cfg.queries,
                     "episodes": cfg.episodes, "seeds": list(cfg.seeds)},
            "statistics": {"episodes": PAIRED_EPISODES, "seeds": PAIRED_SEEDS},
            "shared_options": shared_options(plans), "rows": rows, "runs": runs,
            "interrupted": False}


def _mean_over_seeds(lines: list[dict], key: str) -> float | None:
    """The seeds' mean of a to-best figure; None for training-free rows (and for runs recorded
    before sweeps kept it)."""
    values = [line[key] for line in lines if line.get(key) is not None]
    return float(np.mean(values)) if values and len(values) == len(lines) else None


def _paired(episodes: dict, key: tuple[str, int], vs: str | None) -> dict | None:
    """B = the row, A = its reference at the same K, seeds in the same order on both sides:
    over all seeds' episodes pooled, and over the per-seed accuracies (two seeds or more)."""
    if vs is None:
        return None
    a, b = episodes[(vs, key[1])], episodes[key]  # S arrays of (E,)
    by_seed = None
    if len(a) > 1:
        by_seed = paired_test([x.mean() for x in a], [x.mean() for x in b])  # S pairs
    return {"episodes": paired_test(np.concatenate(a), np.concatenate(b)),  # S * E pairs
            "seeds": by_seed}


def shared_options(plans: list[RunPlan]) -> dict:
    """The options every trained run shares (the training budget the table was made with)."""
    trained = [p.requested["options"] for p in plans if not p.training_free]
    if not trained:
        return {}
    shared = dict(trained[0])
    for options in trained[1:]:
        shared = {k: v for k, v in shared.items() if options.get(k, object()) == v}
    return shared


def _csv_line(plan: RunPlan, result: dict, out: Path) -> dict:
    return {"run": plan.name, "shot": plan.shot, "seed": plan.seed, "head": plan.head,
            "options": json.dumps(plan.requested["options"], sort_keys=True),
            "accuracy": round(result["accuracy"], 4), "ci95": round(result["ci95"], 4),
            "episodes": result["episodes"],
            "best_val_acc": (None if result["best_val_acc"] is None
                             else round(result["best_val_acc"], 4)),
            "epochs_done": result["epochs_done"],
            "episodes_file": os.path.relpath(plan.episodes_file, out.resolve()),
            "run_dir": os.path.relpath(plan.run_dir, out.resolve()),
            "device": result["device"], "train_time_s": result["train_time_s"],
            "eval_time_s": result["eval_time_s"],
            **{key: result.get(key) for key in ("best_epoch", "episodes_to_best",
                                                "train_s_to_best")}}


