"""Time to accuracy of training recipes: validation accuracy vs training episodes (issue 13).

    .venv/bin/python bench/recipes.py --work W --cache c64 --candidates paper,fast --seeds 0,1,2
    .venv/bin/python bench/recipes.py --work W --cache len0 --candidates paper,fast --seeds 0
    .venv/bin/python bench/recipes.py --work W --report --test paper,fast --figure docs/figures

Every run trains the default head (TA2N: TTM + TC + SC), 5-way 1-shot with 5 training queries per
class, through align.train.train with one recipe (CANDIDATES) for --episodes episodes, validating
every 100 episodes on the run's fixed validation episodes, with early stopping off so every curve
is complete. Its curve, wall time and best.pt land in W/<cache>/<candidate>-<episodes>ep-s<seed>/;
a finished run is skipped and a killed one resumed (bit for bit), so the study can be stopped and
started again, and split across processes by cache, candidate or seed. A run of a step or
constant schedule continues the same run with a smaller budget, if there is one.

Selection uses validation episodes only. `--report` prints, per cache and candidate, the mean +- std
over seeds of the validation accuracy after 100 ... 3000 episodes, the episodes to get within 90%
of the way from chance to the best final accuracy, the early stop the default cadence (validation
every 200 episodes, the recipe's patience) would have made, and seconds per episode. `--test A,B`
then scores the best.pt (by validation) of those candidates once on the same 1000 test episodes of
every cache; `--figure DIR` draws recipes_<cache>.png: mean +- std of the validation curves.

Caches (made in W on first use with `synth`'s generator, or `toy-data` + `extract` for toy):
c64 the `synth` default (C = 64, sequences of 4 of 4 patterns); len0 pure permutations of 5
patterns (only the order tells classes apart); c256 C = 256; toy the demo's video dataset through
a random-weight ResNet-18 (no ImageNet weights here: features near chance, a smoke check).

The trajectory of a run does not depend on how often it validates (validation is in eval mode,
every random choice of training episode i derives from (seed, i)), so the curve's points at 200,
400, ... episodes are what `train-heads` with that recipe sees at its validations, measured on
the first --val-episodes (200) of its 500 validation episodes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.checkpoints import load_head  # noqa: E402
from align.evaluate import EvalConfig, evaluate  # noqa: E402
from align.recipes import FAST_RECIPE, TrainConfig  # noqa: E402
from align.train import train  # noqa: E402
from cache import FeatureCache  # noqa: E402
from cache.synthetic import SynthConfig, generate_synthetic  # noqa: E402

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
EPISODES_PER_EPOCH = 100  # validation cadence of the study; the paper's lr_step is rescaled
POINTS = (100, 200, 300, 500, 1000, 1500, 2000, 3000)
CACHES = {
    "c64": dict(),
    "len0": dict(length=0, patterns=5),
    "c256": dict(channels=256),
}

# name -> TrainConfig values. "paper" is today's synthetic recipe (SGD lr 1e-3 momentum 0.9, 4 tasks
# per step, lr halved every 1000 episodes); "fast" is whatever FAST_RECIPE holds; the others are
# the candidates it was chosen from.
CANDIDATES = {
    "paper": dict(recipe="paper"),
    "fast": dict(recipe="fast"),
    "adam": dict(recipe="fast", optimizer="adam", lr=1e-3, schedule="constant", warmup=0,
                 tasks_per_batch=1, dropout=0.5),
    "adam-lr3e-3": dict(recipe="fast", optimizer="adam", lr=3e-3, schedule="constant",
                        warmup=0, tasks_per_batch=1, dropout=0.5),
    "adam-lr3e-4": dict(recipe="fast", optimizer="adam", lr=3e-4, schedule="constant",
                        warmup=0, tasks_per_batch=1, dropout=0.5),
    "adam-tpb4": dict(recipe="fast", optimizer="adam", lr=1e-3, schedule="constant", warmup=0,
                      tasks_per_batch=4, dropout=0.5),
    "adam-dropout0": dict(recipe="fast", optimizer="adam", lr=1e-3, schedule="constant",
                          warmup=0, tasks_per_batch=1, dropout=0.0),
    "adamw-wd0.05": dict(recipe="fast", optimizer="adamw", lr=1e-3, weight_decay=0.05,
                         schedule="constant", warmup=0, tasks_per_batch=1, dropout=0.5),
    "adam-cosine": dict(recipe="fast", optimizer="adam", lr=1e-3, schedule="cosine", warmup=0,
                        tasks_per_batch=1, dropout=0.5),
    "adam-warmup-cosine": dict(recipe="fast", optimizer="adam", lr=1e-3, schedule="cosine",
                               warmup=100, tasks_per_batch=1, dropout=0.5),
    "adam-lr3e-3-cosine": dict(recipe="fast", optimizer="adam", lr=3e-3, schedule="cosine",
                               warmup=0, tasks_per_batch=1, dropout=0.5),
    "sgd-lr1e-2": dict(recipe="paper", lr=1e-2),
    "sgd-tpb1": dict(recipe="paper", tasks_per_batch=1),
}


# ------------------------------------------------------------------------------ caches
def cache_path(work: Path, name: str) -> str:
    """The study's cache ``name`` in ``work``, made on first use."""
    path = work / f"{name}.zarr"
    if not (path / "zarr.json").exists():
        print(f"--- making cache {name} in {path}", flush=True)
        if name == "toy":
            make_toy_cache(work, path)
        else:
            generate_synthetic(str(path), SynthConfig(**CACHES[name]), overwrite=True,
                               progress=False)
    return str(path)


def make_toy_cache(work: Path, path: Path) -> None:
    """The demo's toy videos (10 per class) through a random-weight ResNet-18, 4 x 4 maps."""
    data = work / "toy-data"
    commands = [
        ["toy-data", "--out", str(data), "--train-classes", "8", "--val-classes", "5",
         "--test-classes", "5", "--videos-per-class", "10", "--frames", "32", "--size", "128",
         "--seed", "0"],
        ["extract", "--dataset", "custom", "--root", str(data / "videos"), "--split-dir",
         str(data / "splits"), "--out", str(path), "--backbone", "resnet18", "--weights", "none",
         "--frames", "8", "--image-size", "112", "--resize", "128", "--seed", "0",
         "--device", "cpu", "--overwrite"]]
    for args in commands:
        subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=work, check=True)


# ------------------------------------------------------------------------------ one run
def run_config(cache: str, out: Path, candidate: str, seed: int, episodes: int,
               val_episodes: int, sc: bool) -> TrainConfig:
    values = dict(CANDIDATES[candidate])
    if values["recipe"] == "paper":
        # the paper's synthetic schedule (x0.5 every 5 epochs of 200) in 100-episode epochs
        values.setdefault("lr_step", 10)
    return TrainConfig(cache=cache, out=str(out), head_options={"sc": sc},
                       way=5, shot=1, queries=5, seed=seed,
                       epochs=episodes // EPISODES_PER_EPOCH,
                       episodes_per_epoch=EPISODES_PER_EPOCH, val_every=1,
                       val_episodes=val_episodes, patience=0, preload="ram", workers=1,
                       **values)


def study_name(cache_name: str, sc: bool) -> str:
    return cache_name if sc else f"{cache_name}-nosc"


def run_one(work: Path, cache_name: str, candidate: str, seed: int, args) -> dict:
    """Train one (cache, candidate, seed) run, or read it back if it is done."""
    name = study_name(cache_name, args.sc)
    out = work / name / f"{candidate}-{args.episodes}ep-s{seed}"
    result_file = out / "curve.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    shorter = shorter_run(work / name, candidate, seed, args.episodes)
    if not (out / "last.pt").exists() and shorter is not None:
        extend_run(shorter, out, args.episodes)
    tick = time.perf_counter()
    if (out / "last.pt").exists():  # killed half-way (or extended): continue it bit for bit
        summary = train(device=CPU, resume=str(out), progress=False, log=lambda m: None)
    else:
        cfg = run_config(cache_path(work, cache_name), out, candidate, seed, args.episodes,
                         args.val_episodes, args.sc)
        summary = train(cfg, device=CPU, progress=False, log=lambda m: None)
    wall = time.perf_counter() - tick
    history = summary["history"]
    result = {"study": name, "cache": cache_name, "candidate": candidate, "seed": seed,
              "config": summary["config"],
              "episodes": [row["epoch"] * EPISODES_PER_EPOCH for row in history],
              "val_acc": [row["val_acc"] for row in history],
              "train_loss": [row["train_loss"] for row in history],
              "train_s": sum(row["epoch_time_s"] for row in history), "wall_s": wall,
              "best": summary["best"]}
    result_file.write_text(json.dumps(result, indent=1))
    print(f"    {name} {candidate} seed {seed}: val "
          + " ".join(f"{e}:{a:.1f}" for e, a in zip(result["episodes"], result["val_acc"])
                     if e in POINTS)
          + f"  ({wall:.0f} s, {result['train_s'] / result['episodes'][-1]:.3f} s/episode)",
          flush=True)
    return result


def shorter_run(study: Path, candidate: str, seed: int, episodes: int) -> Path | None:
    """The longest unfinished-or-finished run of ``candidate`` and ``seed`` with a smaller budget
    whose schedule does not depend on the budget (step or constant: the same trajectory as the
    first episodes of a longer run), so a longer study can continue it instead of starting over."""
    runs = []
    for folder in study.glob(f"{candidate}-*ep-s{seed}"):
        match = re.fullmatch(rf"{re.escape(candidate)}-(\d+)ep-s{seed}", folder.name)
        if match is None:  # another candidate whose name starts with this one's
            continue
        budget, config = int(match[1]), folder / "config.json"
        if budget >= episodes or not (folder / "last.pt").exists() or not config.exists():
            continue
        try:
            schedule = json.loads(config.read_text())["train"]["schedule"]
        except (ValueError, KeyError, TypeError):  # unreadable: not a run to continue
            continue
        if schedule in ("step", "constant"):
            runs.append((budget, folder))
    return max(runs)[1] if runs else None


def extend_run(shorter: Path, out: Path, episodes: int) -> None:
    """Copy ``shorter`` to ``out`` with its budget raised to ``episodes``, ready to resume: with a
    budget-independent schedule, resuming it equals training ``episodes`` from the start
    (resume is bit for bit: tests/align/test_train.py)."""
    shutil.copytree(shorter, out)
    (out / "curve.json").unlink(missing_ok=True)
    saved = json.loads((out / "config.json").read_text())
    for key in ("requested", "train"):
        saved[key]["epochs"] = episodes // EPISODES_PER_EPOCH
        saved[key]["out"] = str(out)
    (out / "config.json").write_text(json.dumps(saved, indent=1))
    print(f"    {out.name}: continues {shorter.name}", flush=True)


# ------------------------------------------------------------------------------ report
def load_results(work: Path) -> dict:
    """{study: {"<candidate>@<episodes>": [result per seed]}} of every finished run in ``work``
    (a study is a cache, with "-nosc" when trained without SC)."""
    results: dict = {}
    for path in sorted(work.glob("*/*/curve.json")):
        r = json.loads(path.read_text())
        key = f"{r['candidate']}@{r['episodes'][-1]}"
        results.setdefault(r["study"], {}).setdefault(key, []).append(r)
    return results


def curve_stats(runs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(episodes, mean, std over seeds) on the episodes all runs reached."""
    n = min(len(r["val_acc"]) for r in runs)
    acc = np.array([r["val_acc"][:n] for r in runs], dtype=float)  # (seeds, points)
    return np.array(runs[0]["episodes"][:n]), acc.mean(0), acc.std(0)


def episodes_to_reach(episodes: np.ndarray, mean: np.ndarray, target: float) -> int | None:
    hits = np.flatnonzero(mean >= target)
    return int(episodes[hits[0]]) if hits.size else None


def simulated_stop(run: dict, patience: int, every: int = 200) -> tuple[int, float] | None:
    """(episodes trained, best val accuracy) where early stopping with validation every
    ``every`` episodes would have stopped this run, or None if it would not have (the curve's
    points at those episodes: the same trajectory, on the study's validation episodes)."""
    best, since = -1.0, 0
    for e, a in zip(run["episodes"], run["val_acc"]):
        if e % every:
            continue
        best, since = (a, 0) if a > best else (best, since + 1)
        if patience and since >= patience and e < run["episodes"][-1]:  # the end: the budget
            return e, best
    return None


def report(results: dict, patience: int) -> None:
    for study, by_candidate in results.items():
        chance = 20.0
        finals = {c: curve_stats(r)[1][-1] for c, r in by_candidate.items()}
        top = max(finals.values())
        target = chance + 0.9 * (top - chance)
        print(f"\n=== {study}: validation accuracy (%) after N training episodes, mean +- "
              f"std over seeds; 'to 90%': episodes until the mean curve is 90% of the way from "
              f"chance to the best final mean ({target:.1f}%); s/ep: training seconds per "
              "episode")
        header = "".join(f"{p:>12}" for p in POINTS)
        print(f"{'candidate@episodes':<26}{'seeds':>6}{header}{'to 90%':>9}{'s/ep':>7}  "
              f"early stop (val every 200, patience {patience}): runs stopped, mean "
              "episodes, best val")
        for candidate, runs in by_candidate.items():
            episodes, mean, std = curve_stats(runs)
            cells = ""
            for p in POINTS:
                i = np.flatnonzero(episodes == p)
                cells += f"{mean[i[0]]:>6.1f} +-{std[i[0]]:>4.1f}" if i.size else f"{'':>12}"
            reach = episodes_to_reach(episodes, mean, target)
            stops = [s for s in (simulated_stop(r, patience) for r in runs) if s]
            stop = (f"{len(stops)}/{len(runs)} {np.mean([s[0] for s in stops]):>5.0f}"
                    f"{np.mean([s[1] for s in stops]):>7.1f}" if stops else f"0/{len(runs)}")
            per_ep = np.mean([r["train_s"] / r["episodes"][-1] for r in runs])
            print(f"{candidate:<26}{len(runs):>6}{cells}{reach or '-':>9}{per_ep:>7.3f}  {stop}")


def patience_table(results: dict, key: str, patiences=(2, 3, 4, 5, 8)) -> None:
    """What early stopping (validation every 200 episodes) would have done to the ``key`` runs
    for each patience: episodes trained and best validation accuracy, against the full budget."""
    for study, by_candidate in results.items():
        runs = by_candidate.get(key)
        if not runs:
            continue
        full = np.mean([max(a for e, a in zip(r["episodes"], r["val_acc"]) if e % 200 == 0)
                        for r in runs])
        print(f"\n=== {study} {key}: early stopping, validation every 200 episodes (the full "
              f"budget: {runs[0]['episodes'][-1]} episodes, best val {full:.2f})")
        for patience in patiences:
            trained, bests = [], []
            for r in runs:
                stop = simulated_stop(r, patience)
                trained.append(stop[0] if stop else r["episodes"][-1])
                bests.append(stop[1] if stop else max(
                    a for e, a in zip(r["episodes"], r["val_acc"]) if e % 200 == 0))
            print(f"patience {patience}: {np.mean(trained):6.0f} episodes trained "
                  f"(per seed: {', '.join(str(t) for t in trained)}), best val "
                  f"{np.mean(bests):.2f}")


def test_scores(work: Path, results: dict, candidates: list[str], episodes: int) -> None:
    """Each listed candidate's best.pt (chosen on validation) on the same test episodes."""
    print(f"\n=== test accuracy of best.pt (by validation), {episodes} test episodes "
          "(seed 0, identical for every run of a cache), mean +- std over seeds")
    for study, by_candidate in results.items():
        cache_name = next(iter(by_candidate.values()))[0]["cache"]
        with FeatureCache.open(cache_path(work, cache_name)) as cache:
            for candidate in candidates:
                accs = []
                for run in by_candidate.get(candidate, []):
                    cfg = EvalConfig(episodes=episodes, shot=1, seed=0, preload="ram", workers=1)
                    accs.append(evaluate(load_head(run["best"]), cache, cfg, device=CPU,
                                         progress=False)["accuracy"])
                if accs:
                    print(f"{study:<10} {candidate:<26} {np.mean(accs):6.2f} +- "
                          f"{np.std(accs):.2f}  ({len(accs)} seeds: "
                          + ", ".join(f"{a:.2f}" for a in accs) + ")", flush=True)


def figure(results: dict, out: Path, candidates: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    for study, by_candidate in results.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        for candidate in candidates:
            runs = by_candidate.get(candidate)
            if not runs:
                continue
            episodes, mean, std = curve_stats(runs)
            line, = ax.plot(episodes, mean, label=f"{candidate} ({len(runs)} seeds)")
            ax.fill_between(episodes, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.axhline(20, color="grey", lw=0.8, ls=":", label="chance")
        head = "TA2N without SC (TTM + TC)" if study.endswith("-nosc") else "TA2N"
        ax.set(xlabel="training episodes", ylabel="validation accuracy (%)",
               title=f"{head}, 5-way 1-shot, synth {study.split('-')[0]}: mean +- std")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = out / f"recipes_{study}.png"
        fig.savefig(path)
        plt.close(fig)
        print(f"figure {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="Folder of the study's caches and runs.")
    parser.add_argument("--cache", default="c64", choices=[*CACHES, "toy"])
    parser.add_argument("--candidates", default="paper,fast",
                        help=f"Comma-separated, of: {', '.join(CANDIDATES)}.")
    parser.add_argument("--seeds", default="0", help="Comma-separated seeds.")
    parser.add_argument("--episodes", type=int, default=3000, help="Training episodes per run.")
    parser.add_argument("--val-episodes", type=int, default=200,
                        help="Validation episodes (5 queries each) per point of a curve.")
    parser.add_argument("--report", action="store_true", help="Summarise the finished runs.")
    parser.add_argument("--test", default=None,
                        help="Runs whose best.pt to test once, as candidate@episodes "
                             "(e.g. paper@3000,fast@3000).")
    parser.add_argument("--test-episodes", type=int, default=1000)
    parser.add_argument("--figure", default=None, help="Folder for the curves' figures.")
    parser.add_argument("--figure-runs", default="paper@3000,fast@3000",
                        help="The curves drawn, as candidate@episodes.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads.")
    parser.add_argument("--no-sc", dest="sc", action="store_false",
                        help="Train TA2N without SC (TTM + TC: about 7x cheaper per episode "
                             "here), for screening; its runs are reported as <cache>-nosc.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # train and generate_synthetic remember their outputs under the cwd
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; fast = {FAST_RECIPE}", flush=True)
    if not args.report:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for candidate in args.candidates.split(","):
                run_one(work, args.cache, candidate, seed, args)
        return
    results = load_results(work)
    report(results, FAST_RECIPE["patience"])
    patience_table(results, "fast@3000")
    if args.test:
        test_scores(work, results, args.test.split(","), args.test_episodes)
    if args.figure:
        figure(results, Path(args.figure) if Path(args.figure).is_absolute()
               else ROOT / args.figure, args.figure_runs.split(","))


if __name__ == "__main__":
    main()
