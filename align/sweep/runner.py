"""Running a sweep: one run (train or resume, then evaluate on the saved episodes), the
runs spread over workers through joblib, and ``run_sweep``, the entry point. A run's result is
a function of its config alone (seeded episodes, seeded init, fixed torch threads), so serial,
``--jobs N`` processes and one process per ``--devices`` entry give the same numbers; with
``scheduler`` the runs are tasks on a Dask cluster instead (align/cluster.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from joblib import Parallel, delayed

from align.evaluate import EvalConfig, evaluate
from align.recipes import TrainConfig
from align.runs import RUNS_ROOT, HeadSource, load_head_source
from align.sweep.output import write_outputs
from align.sweep.plan import (
    REPORT_FILE,
    RUN_FILE,
    RunPlan,
    SweepConfig,
    plan_runs,
    prepare_episodes,
    resolve_reference,
    run_state,
)
from align.sweep.spec import SweepSpec, slug
from align.sweep.summary import summarise
from align.train import train
from cache import FeatureCache, UserError
from cache.atomic import write_json
from cache.latest import resolve_cache
from cache.paths import claim_folder


# ------------------------------------------------------------------------------ one run
def _print(message: str) -> None:
    print(message, flush=True)


def _quiet(message: str) -> None:
    """Training's own messages stay in its run directory's files; the sweep prints per run."""


def execute_run(plan: RunPlan, device: str, threads: int, log: Callable | None = None) -> dict:
    """Train (or resume) and evaluate one run on ``device`` with ``threads`` torch threads;
    write its result into sweep-run.json. Runs in a worker process or in the caller's."""
    log = log or _print
    if os.getcwd() != plan.workdir and os.path.isdir(plan.workdir):
        os.chdir(plan.workdir)  # a reused worker may have started elsewhere: runs/latest.json
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        log(f"{plan.tag} started on {device}")
        torch_device = torch.device(device)
        tick = time.perf_counter()
        summary = _train_run(plan, torch_device)
        if summary is not None and summary["interrupted"]:
            log(f"{plan.tag} interrupted: last.pt saved; rerun the sweep to continue")
            return {"index": plan.index, "interrupted": True}
        train_time = time.perf_counter() - tick
        report = _evaluate_run(plan, torch_device)
        result = {"accuracy": report["accuracy"], "ci95": report["ci95"],
                  "episodes": report["episodes"],
                  "best_val_acc": summary["best_val_acc"] if summary else None,
                  "epochs_done": summary["epochs_done"] if summary else 0,
                  "device": device, "threads": threads,
                  "train_time_s": round(train_time, 3) if summary else 0.0,
                  "eval_time_s": report["wall_time_s"], **to_best(summary)}
        write_json(Path(plan.run_dir) / RUN_FILE, {"requested": plan.requested, "result": result})
        trained = (f"trained {result['epochs_done']} epochs in {train_time:.1f} s, "
                   if summary else "no training, ")
        log(f"{plan.tag} test {report['accuracy']:.2f} +- {report['ci95']:.2f} ({trained}"
            f"evaluated in {report['wall_time_s']:.1f} s)")
        return {"index": plan.index, "interrupted": False, **result}
    finally:
        torch.set_num_threads(previous)


def to_best(summary: dict | None) -> dict:
    """How long a run trained to the checkpoint it is tested with (best.pt): its epoch (the
    first of the best validation accuracy; without validation the last), the training
    episodes before it, and the training seconds of those epochs (validation not counted).
    All None for a training-free head."""
    if summary is None or not summary["history"]:
        return {"best_epoch": None, "episodes_to_best": None, "train_s_to_best": None}
    history = summary["history"]
    validated = [row for row in history if row["val_acc"] is not None]
    best = (max(validated, key=lambda row: row["val_acc"]) if validated else history[-1])["epoch"]
    seconds = sum(row["epoch_time_s"] for row in history if row["epoch"] <= best)
    return {"best_epoch": best,
            "episodes_to_best": best * summary["config"]["episodes_per_epoch"],
            "train_s_to_best": round(seconds, 3)}


def execute_queue(plans: list[RunPlan], device: str, threads: int) -> list[dict]:
    """A worker pinned to one device: its runs one after another (stops if interrupted)."""
    results = []
    for plan in plans:
        results.append(execute_run(plan, device, threads))
        if results[-1]["interrupted"]:
            break
    return results


def _train_run(plan: RunPlan, device: torch.device) -> dict | None:
    """train-heads for a run (resumed from last.pt when there is one); None: training-free."""
    if plan.training_free:
        return None
    run_dir = Path(plan.run_dir)
    if (run_dir / "last.pt").exists():
        return train(None, device=device, resume=str(run_dir), log=_quiet, progress=False)
    return train(TrainConfig(**plan.train), device=device, log=_quiet, progress=False)


def _evaluate_run(plan: RunPlan, device: torch.device) -> dict:
    """evaluate on the sweep's saved episodes; the report lands in the run directory."""
    run_dir = Path(plan.run_dir)
    cache_path = plan.train["cache"]
    checkpoint = None if plan.training_free else str(run_dir / "best.pt")
    with FeatureCache.open(cache_path) as cache:
        source = HeadSource(checkpoint=checkpoint, kind=plan.head, cache=cache_path,
                            shot=plan.shot)
        head, facts = load_head_source(source, cache, seed=plan.seed)
        cfg = EvalConfig(episodes_from=plan.episodes_file, **plan.eval_options)
        return evaluate(head, cache, cfg, device=device, head_config=asdict(head.config),
                        checkpoint=checkpoint, checkpoint_config=facts,
                        report=str(run_dir / REPORT_FILE), progress=False)


# ------------------------------------------------------------------------------ dispatch
def balance(plans: list[RunPlan], workers: int) -> list[list[RunPlan]]:
    """Runs over ``workers`` queues, the costliest first onto the least loaded queue (LPT);
    each queue then runs in sweep order."""
    queues: list[list[RunPlan]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for plan in sorted(plans, key=lambda p: (-p.cost, p.index)):
        i = loads.index(min(loads))
        queues[i].append(plan)
        loads[i] += plan.cost + 1.0  # + 1: an evaluation costs something too
    return [sorted(q, key=lambda p: p.index) for q in queues]


def dispatch(plans: list[RunPlan], cfg: SweepConfig, log: Callable) -> list[dict]:
    """Run ``plans``: in this process, over ``jobs`` processes of one device, or one process
    per device; returns their results (in completion order)."""
    if not plans:
        return []
    if cfg.scheduler is not None:
        from align.cluster import run_on_cluster

        return run_on_cluster(plans, cfg, log)
    devices = list(cfg.devices)
    if len(devices) == 1 and cfg.jobs == 1:
        results = []
        for plan in plans:
            results.append(execute_run(plan, devices[0], cfg.threads, log))
            if results[-1]["interrupted"]:
                break
        return results
    if len(devices) > 1:
        queues = balance(plans, len(devices))
        tasks = [delayed(execute_queue)(q, d, cfg.threads) for d, q in zip(devices, queues) if q]
        workers = len(devices)
    else:
        tasks = [delayed(execute_run)(p, devices[0], cfg.threads) for p in plans]
        workers = cfg.jobs
    results = []
    parallel = Parallel(n_jobs=workers, backend=cfg.backend, return_as="generator_unordered")
    for out in parallel(tasks):
        results.extend(out if isinstance(out, list) else [out])
    return results


def describe_workers(cfg: SweepConfig) -> str:
    if cfg.scheduler is not None:
        return f"the Dask cluster {cfg.scheduler} ({cfg.devices[0]} on each worker)"
    if len(cfg.devices) > 1:
        return f"one {cfg.backend} process per device ({', '.join(cfg.devices)})"
    if cfg.jobs > 1:
        return f"{cfg.jobs} {cfg.backend} processes on {cfg.devices[0]}"
    return f"this process on {cfg.devices[0]}"


# ------------------------------------------------------------------------------ the sweep
def run_sweep(spec: SweepSpec, cfg: SweepConfig, *, log: Callable = print,
              draw: Callable[[dict, Path], None] | None = None) -> dict:
    """Run (or continue) a sweep and write sweep.csv, sweep.md, sweep.json (and the figure
    ``draw(summary, path)`` makes). Returns the summary (``interrupted`` if a run was)."""
    start = time.perf_counter()
    _check_config(cfg)
    references = resolve_reference(spec, cfg)
    cache_path = resolve_cache(cfg.cache, log)
    with FeatureCache.open(cache_path) as cache:
        out = Path(cfg.out or RUNS_ROOT / f"sweep-{slug(spec.title)}-"
                   f"{Path(str(cache_path).rstrip('/')).stem}")
        claim_folder(out, "sweep", "--out", legacy=_made_before_markers)  # never a user's
        plans = plan_runs(spec, cfg, cache_path, out)
        check_references(plans, references)
        states = [run_state(p) for p in plans]  # refuses changed runs before anything runs
        prepare_episodes(plans, cache, cfg)
    todo = [p for p, s in zip(plans, states) if s != "done"]
    for plan, state in zip(plans, states):
        if state == "new":
            claim_folder(plan.run_dir, "train-heads")  # the sweep makes it for its run
            write_json(Path(plan.run_dir) / RUN_FILE, {"requested": plan.requested})
    log(f"sweep  {spec.title}: {len(plans) // len(cfg.seeds)} rows x {len(cfg.seeds)} seeds = "
        f"{len(plans)} runs in {out}; {states.count('done')} done, {states.count('resume')} "
        f"to resume, {states.count('new')} to run, on {describe_workers(cfg)}")
    results = dispatch(todo, cfg, log)
    if any(r["interrupted"] for r in results) or len(results) < len(todo):
        return {"interrupted": True, "out": str(out)}
    summary = summarise(spec, cfg, plans, references, out, cache_path)
    summary["wall_time_s"] = round(time.perf_counter() - start, 1)
    return write_outputs(summary, out, draw)


def _made_before_markers(out: Path) -> bool:
    """A sweep folder from before folder markers: its runs hold this sweep's records."""
    return any(out.glob(f"runs/*/{RUN_FILE}"))


def check_references(plans: list[RunPlan], references: dict[str, str | None]) -> None:
    """Every compared row has its reference at the same K (the same episodes)."""
    keys = {(p.name, p.shot) for p in plans}
    for name, shot in sorted(keys, key=lambda k: (k[1], k[0])):
        vs = references[name]
        if vs is not None and (vs, shot) not in keys:
            raise UserError(f"run {name!r} (K={shot}) is compared with {vs!r}, which has no "
                            f"K={shot} run (paired tests need the same episodes)")


def _check_config(cfg: SweepConfig) -> None:
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise UserError(f"--seeds must name distinct seeds, got {list(cfg.seeds)}")
    if cfg.shots is not None and (not cfg.shots or min(cfg.shots) < 1):
        raise UserError(f"--shots must be positive integers, got {list(cfg.shots)}")
    if cfg.episodes < 2:
        raise UserError("--episodes must be at least 2 (a paired test needs pairs)")
    if cfg.jobs < 1 or cfg.threads < 1:
        raise UserError("--jobs and --threads must be at least 1")
    if cfg.scheduler is not None:
        from align.cluster import check_cluster_config

        check_cluster_config(cfg)
    if cfg.jobs > 1 and len(cfg.devices) > 1:
        raise UserError("give --jobs (processes on one device) or several --devices (one "
                        "process each), not both")


