"""A sweep's plan and its state on disk: one run per (row, K, seed), each a normal run
directory under the sweep folder (``train`` writes config.json, metrics.csv, best.pt, last.pt; the
sweep adds ``sweep-run.json`` and the ``eval.json`` report of ``evaluate``); the test episodes,
saved once per (split, way, K, queries, episodes, seed) and replayed for every run, so the runs of
one seed are scored on identical tasks; resume: a rerun skips runs whose report exists, resumes
runs that have last.pt, and refuses a run whose recorded options differ, naming the
difference."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from align.episodes import EpisodeSampler, Stream, save_episodes
from align.models import head_class
from align.options import DEFAULT_WAY
from align.recipes import TrainConfig, upgrade_train_payload
from align.sweep.spec import EVAL_OPTIONS, RunSpec, SweepSpec, check_set, run_options, slug
from cache import FeatureCache, UserError
from cache.options import option
from cache.paths import MARKER

RUN_FILE = "sweep-run.json"  # in each run directory: what the sweep asked for, and its result
REPORT_FILE = "eval.json"  # in each run directory: evaluate's report on the sweep's episodes


# ------------------------------------------------------------------------------ the plan
@dataclass
class SweepConfig:
    """How a sweep runs (the spec says what).

    Args:
        cache: the feature cache (None: the most recently written one).
        out: the sweep folder (None: runs/sweep-<title>-<cache name>).
        seeds: each run is trained and tested once per seed.
        shots: K values (None: the spec's).
        episodes, way, queries, split: the saved test episodes every run is scored on.
        overrides: train-heads options applied over every run's (``--set``).
        reference: compare every row with this one (None: each run's ``vs``, else the spec's
            reference, else the first row).
        devices: torch device names; more than one: one worker process per entry.
        jobs: worker processes on a single device (1: in this process).
        threads: torch threads per run, fixed so that results do not depend on ``jobs``.
        backend: the joblib backend ("loky" for local processes; "dask" / "ray" inside their
            clients spread the runs over a cluster).
        scheduler: a Dask scheduler (tcp://HOST:PORT, a scheduler file) or local:N: the runs
            are tasks on its workers (align/cluster.py); devices then names one device, which
            each worker resolves for itself.
    """

    cache: str | None = option(None, help="Feature cache [default: the most recently extracted "
                               "one].")
    out: str | None = option(None, help="Sweep folder [default: runs/sweep-<preset or file>-"
                             "<cache name>]; rerunning into it skips finished runs.")
    seeds: tuple[int, ...] = (0, 1, 2)
    shots: tuple[int, ...] | None = None
    episodes: int = option(5000, help="Saved test episodes per seed (every run is scored on "
                           "them).")
    way: int = option(DEFAULT_WAY)
    queries: int = option(1, help="Test queries per class.")
    split: str = "test"
    overrides: dict = field(default_factory=dict)
    reference: str | None = option(None, metavar="RUN", help="Compare every row with this run "
                                   "[default: each run's vs, else the first].")
    devices: tuple[str, ...] = ("cpu",)
    jobs: int = option(1, help="Worker processes on one device (1: this process).")
    threads: int = option(1, help="torch threads per run (fixed, so results do not depend on "
                          "--jobs).")
    backend: str = "loky"
    scheduler: str | None = option(None, metavar="ADDRESS",
                                   help="Run the runs on a Dask cluster: tcp://HOST:PORT, a "
                                        "scheduler file (.json) or local:N (N worker processes "
                                        "here); the cache and --out must be on a filesystem "
                                        "every worker shares (see docs/cluster.md).")


@dataclass
class RunPlan:
    """One (row, K, seed) of a sweep, everything a worker process needs (plain, picklable).

    Args:
        index, total: its place in the sweep (for progress lines).
        name, shot, seed, head: the row, K, the seed of training and test episodes, the head.
        training_free: evaluated without training (ProtoNet, OTAM).
        train: TrainConfig fields (cache, seed, shot, out included).
        requested: what identifies the run on disk (compared on rerun).
        run_dir, episodes_file, workdir: absolute paths, and the folder relative paths
            (the cache, runs/latest.json) are relative to.
        eval_options: EvalConfig fields taken from the run's options.
        cost: relative training work, to balance runs over devices.
    """

    index: int
    total: int
    name: str
    shot: int
    seed: int
    head: str
    training_free: bool
    train: dict
    requested: dict
    run_dir: str
    episodes_file: str
    workdir: str
    eval_options: dict
    cost: float

    @property
    def tag(self) -> str:
        return f"[{self.index + 1}/{self.total}] {self.name} (K={self.shot}, seed {self.seed})"


def episodes_name(cfg: SweepConfig, shot: int, seed: int) -> str:
    return (f"{cfg.split}-{cfg.way}way-{shot}shot-{cfg.queries}q-{cfg.episodes}ep-"
            f"seed{seed}.json")


def row_keys(spec: SweepSpec, cfg: SweepConfig) -> list[tuple[RunSpec, int]]:
    """(run, K) pairs in table order: K blocks, runs in spec order within each."""
    shots = list(cfg.shots) if cfg.shots else spec.shots
    pairs = [(run, k) for k in shots for run in spec.runs if "shot" not in run.options]
    pairs += [(run, run.options["shot"]) for run in spec.runs if "shot" in run.options]
    return sorted(pairs, key=lambda p: (p[1], spec.runs.index(p[0])))


def plan_runs(spec: SweepSpec, cfg: SweepConfig, cache_path: str, out: Path) -> list[RunPlan]:
    """Every (row, K, seed) of the sweep as a ``RunPlan``, rows first, seeds inner."""
    keys = row_keys(spec, cfg)
    total = len(keys) * len(cfg.seeds)
    check_set(spec, cfg.overrides)
    plans = []
    for run, shot in keys:
        options = {"way": cfg.way, **run_options(run, cfg.overrides)}
        options.pop("shot", None)
        head = options.get("head", TrainConfig.head)
        for seed in cfg.seeds:
            plans.append(_plan(run.name, head, options, shot, seed, cfg, cache_path, out,
                               len(plans), total))
    return plans


def _plan(name: str, head: str, options: dict, shot: int, seed: int, cfg: SweepConfig,
          cache_path: str, out: Path, index: int, total: int) -> RunPlan:
    training_free = head_class(head).training_free
    run_dir = (out / "runs" / f"{slug(name)}-{shot}shot-seed{seed}").resolve()
    train_fields = {**options, "cache": _absolute(cache_path), "seed": seed, "shot": shot,
                    "out": str(run_dir)}
    # a training-free head's result depends on its head and the episodes only
    kept = {"head": head} if training_free else options
    requested = {"name": name, "cache": cache_path, "shot": shot, "seed": seed, "options": kept,
                 "test": {"split": cfg.split, "way": cfg.way, "queries": cfg.queries,
                          "episodes": cfg.episodes}}
    return RunPlan(
        index=index, total=total, name=name, shot=shot, seed=seed, head=head,
        training_free=training_free, train=train_fields,
        requested=json.loads(json.dumps(requested)), run_dir=str(run_dir),
        episodes_file=str((out / "episodes" / episodes_name(cfg, shot, seed)).resolve()),
        workdir=os.getcwd(),
        eval_options={k: options[k] for k in EVAL_OPTIONS if k in options},
        cost=0.0 if training_free else _training_cost(train_fields))


def _absolute(path: str) -> str:
    """A local path made absolute for workers wherever they start; URLs (s3://...) as given."""
    return path if "://" in str(path) else str(Path(path).resolve())


def _training_cost(train_fields: dict) -> float:
    """Episodes x videos per episode; unset epochs (the dataset's recipe) count as equal."""
    cfg = TrainConfig(**train_fields)
    return float((cfg.epochs or 1) * cfg.episodes_per_epoch * cfg.way * (cfg.shot + cfg.queries))


def resolve_reference(spec: SweepSpec, cfg: SweepConfig) -> dict[str, str | None]:
    """Row name -> the row it is compared with (None for the reference itself)."""
    names = [r.name for r in spec.runs]
    if cfg.reference is not None and cfg.reference not in names:
        raise UserError(f"--reference {cfg.reference!r} is not a run; runs: {', '.join(names)}")
    reference = cfg.reference or spec.reference or names[0]
    if cfg.reference is not None:
        return {n: (None if n == reference else reference) for n in names}
    return {r.name: (r.vs or (None if r.name == reference else reference)) for r in spec.runs}


# ------------------------------------------------------------------------------ state on disk
def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Flattened ``key: old (on disk) vs new (asked)`` lines of two JSON dicts."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key} {_show(a)} on disk vs {_show(b)} now")
    return lines


_UNSET = object()


def _show(value) -> str:
    return "unset" if value is _UNSET else repr(value)


def run_state(plan: RunPlan) -> str:
    """"done", "resume" or "new"; raises if the directory holds another run."""
    run_dir = Path(plan.run_dir)
    record_path = run_dir / RUN_FILE
    if not record_path.exists():
        if run_dir.exists() and any(e.name != MARKER for e in run_dir.iterdir()):
            raise UserError(f"{run_dir} holds files this sweep did not write; use another --out")
        return "new"
    try:
        record = json.loads(record_path.read_text())
        requested = record["requested"]
        if isinstance(requested.get("options"), dict):  # TA2N's switches before head_options
            requested = {**requested, "options": upgrade_train_payload(requested["options"])}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{record_path} is damaged ({e}); use another --out") from None
    diff = _differences(requested, plan.requested)
    if diff:
        raise UserError(f"{plan.name!r} (K={plan.shot}, seed {plan.seed}) in {run_dir} was run "
                        f"with other options: {'; '.join(diff)}; use another --out (or move "
                        f"that run directory away to redo it)")
    if "result" in record and (run_dir / REPORT_FILE).exists():
        return "done"
    return "resume" if (run_dir / "last.pt").exists() else "new"


def prepare_episodes(plans: list[RunPlan], cache: FeatureCache, cfg: SweepConfig) -> None:
    """Save each seed's and K's test episodes once (the same draw `evaluate` makes), or check
    the saved file is the one this sweep asks for."""
    for path, (shot, seed) in sorted({(p.episodes_file, (p.shot, p.seed)) for p in plans}):
        asked = {"split": cfg.split, "way": cfg.way, "shot": shot, "queries": cfg.queries,
                 "seed": seed}
        if Path(path).exists():
            payload = json.loads(Path(path).read_text())
            found = {k: payload.get(k) for k in asked}
            if found != asked or len(payload.get("episodes", [])) != cfg.episodes:
                raise UserError(f"{path} holds other episodes ({found}); use another --out")
            continue
        sampler = EpisodeSampler(cache, cfg.split, way=cfg.way, shot=shot, queries=cfg.queries,
                                 seed=seed, stream=Stream.TEST)
        save_episodes(path, sampler.episodes(0, cfg.episodes), cache, split=cfg.split,
                      seed=seed)


