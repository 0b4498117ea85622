"""The paper's Table 2 on one cache: every method trained with the same recipe and scored on the
same saved test episodes, with 95% intervals and a paired test of each method against TA2N.

    python bench/table2.py [--cache caches/synthetic.zarr] [--shots 1 5]
                           [--methods cmn tarn arn protonet trn otam trx ta2n]
                           [--epochs 4] [--episodes-per-epoch 100] [--queries 3] [--lr 0.001]
                           [--lr-for tarn=0.1] [--recipe fast|short|paper] [--val-episodes 200]
                           [--test-episodes 1000]
                           [--seed 0] [--device auto] [--threads 1] [--out runs/table2]

With no cache at ``--cache`` it first writes the default synthetic cache there (``python cli.py
synth``'s defaults: C = 64, T = 8, 7 x 7). Per shot K: ProtoNet's evaluation draws and saves the
test episodes, every other method replays that file; trainable heads are trained by
``align.train.train`` (``python cli.py train-heads``) with one recipe for all - ``fast`` (the
default, train-heads' default recipe): Adam at ``--lr``, cosine to 0 over ``--epochs`` x
``--episodes-per-epoch`` episodes of ``--queries`` queries per class, one episode per step, best
epoch by validation; ``short`` (the recipe before train-heads had Adam): SGD with momentum 0.9,
lr halved every 2 epochs, 4 episodes per step, and TARN at lr 0.1 (with its former product
comparison - checkpoint version 1 - its relation logits started near zero and plain SGD at 1e-3
left it at chance after a few hundred episodes; 0.1 scored best of 1e-2, 0.05, 0.1 and 0.2 on
validation episodes after 400 training episodes; not re-measured with cosine + distance); or
``paper``: the cache's dataset recipe (the paper's, as train-heads uses it). ``--lr-for`` sets
one method's learning rate. Evaluation is
``python cli.py evaluate``'s (``align.evaluate.evaluate_command``): 5-way K-shot, 1 query per
class.

ProtoNet always runs (its evaluation draws the episodes). train() also records each run in
runs/latest.json of the working directory, as train-heads does. Prints the table in the paper's
layout (rows CMN-J, TARN, ARN, ProtoNet, TRN++, OTAM, TRX, TA2N;
a column per shot), accuracy +- 95% CI (1.96 std / sqrt(episodes), the paper's), then per method
the paired difference to TA2N over the same episodes (mean +- 95% CI) with the two-sided paired
t-test's p-value (scipy.stats.ttest_rel), and the wall time of each training and evaluation.
Writes ``table2.json`` and ``table2.md`` and every run and report under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from align.evaluate import EvalConfig, evaluate_command  # noqa: E402
from align.models import head_class  # noqa: E402
from align.train import TrainConfig, train  # noqa: E402
from cache.synthetic import SynthConfig, generate_synthetic  # noqa: E402
from cli import pick_device  # noqa: E402

# Table 2's rows in the paper's order, with the names the paper gives them
LABELS = {"cmn": "CMN-J", "tarn": "TARN", "arn": "ARN", "protonet": "ProtoNet", "trn": "TRN++",
          "otam": "OTAM", "trx": "TRX", "ta2n": "TA2N"}
REFERENCE = "ta2n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="caches/synthetic.zarr")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--methods", nargs="+", default=list(LABELS), choices=list(LABELS))
    p.add_argument("--recipe", default="fast", choices=["fast", "short", "paper"])
    p.add_argument("--epochs", type=int, default=4, help="fast / short recipes: epochs")
    p.add_argument("--episodes-per-epoch", type=int, default=100)
    p.add_argument("--queries", type=int, default=3, help="queries per class in training")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-for", nargs="*", default=None, metavar="METHOD=LR",
                   help="a method's own learning rate (default: none; tarn=0.1 with --recipe "
                        "short)")
    p.add_argument("--val-episodes", type=int, default=200)
    p.add_argument("--test-episodes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared machine more spin and slow down)")
    p.add_argument("--out", default="runs/table2")
    return p.parse_args(argv)


def quiet(message: str) -> None:
    """The library's progress notes are not part of the table."""


def learning_rates(args) -> dict[str, float]:
    """--lr-for METHOD=LR pairs as {method: lr}."""
    rates = {}
    pairs = args.lr_for if args.lr_for is not None else (
        ["tarn=0.1"] if args.recipe == "short" else [])
    for item in pairs:
        kind, _, value = item.partition("=")
        if kind not in LABELS or not value:
            sys.exit(f"--lr-for takes METHOD=LR with METHOD one of {list(LABELS)}, not {item!r}")
        rates[kind] = float(value)
    return rates


def train_config(args, kind: str, shot: int, out: Path) -> TrainConfig:
    """One recipe for every trainable method (the `paper` recipe leaves the schedule to the
    cache's dataset, as train-heads does)."""
    common = dict(cache=args.cache, head=kind, shot=shot, way=5, queries=args.queries,
                  seed=args.seed, lr=learning_rates(args).get(kind, args.lr),
                  val_episodes=args.val_episodes, out=str(out))
    if args.recipe == "paper":
        return TrainConfig(**common, recipe="paper")
    if args.recipe == "fast":  # train-heads' default recipe, on a fixed budget (no early stop)
        return TrainConfig(**common, recipe="fast", epochs=args.epochs,
                           episodes_per_epoch=args.episodes_per_epoch, val_every=1, patience=0)
    return TrainConfig(**common, recipe="paper", epochs=args.epochs,
                       episodes_per_epoch=args.episodes_per_epoch,
                       lr_step=2, lr_gamma=0.5, momentum=0.9, tasks_per_batch=4, val_every=1)


def run_method(args, kind: str, shot: int, episodes_file: Path, device, out: Path) -> dict:
    """Train (if the method learns) and evaluate one method on the saved episodes."""
    record = {"method": kind, "label": LABELS[kind], "shot": shot, "train_s": 0.0}
    checkpoint = None
    if not head_class(kind).training_free:
        tick = time.perf_counter()
        summary = train(train_config(args, kind, shot, out / f"{kind}-{shot}shot"),
                        device=device, progress=False, log=quiet)
        record["train_s"] = time.perf_counter() - tick
        record["best_val_acc"] = summary["best_val_acc"]
        checkpoint = summary["best"]
    first = not episodes_file.exists()  # the first method draws and saves the episodes
    cfg = EvalConfig(shot=shot, way=5, queries=1, episodes=args.test_episodes, seed=args.seed,
                     save_episodes=str(episodes_file) if first else None,
                     episodes_from=None if first else str(episodes_file))
    tick = time.perf_counter()
    report = evaluate_command(cfg, checkpoint=checkpoint, head_kind=None if checkpoint else kind,
                              cache_path=args.cache, shot=shot, device=device,
                              report=str(out / f"eval-{kind}-{shot}shot.json"), log=quiet,
                              progress=False)
    record["eval_s"] = time.perf_counter() - tick
    record.update(accuracy=report["accuracy"], ci95=report["ci95"],
                  episode_accuracy=report["episode_accuracy"], report=report["report"])
    return record


def paired_versus(reference: dict, other: dict) -> dict:
    """Paired difference other - reference over the same episodes: mean, 95% CI of the mean
    (1.96 std / sqrt(n), as the accuracies' intervals) and the paired t-test's p-value."""
    a = np.asarray(reference["episode_accuracy"], dtype=np.float64)
    b = np.asarray(other["episode_accuracy"], dtype=np.float64)
    diff = b - a
    p = float(stats.ttest_rel(b, a).pvalue) if diff.std() > 0 else (1.0 if diff.mean() == 0
                                                                    else 0.0)
    return {"diff": float(diff.mean()), "ci95": float(1.96 * diff.std() / math.sqrt(len(diff))),
            "p": p}


def format_table(results: dict, shots: list[int], methods: list[str], caption: str) -> str:
    """Markdown: Table 2's layout, accuracy +- CI per shot, then the paired test vs TA2N."""
    head = "| method | " + " | ".join(f"{k}-shot" for k in shots)
    if REFERENCE in methods:
        head += " | " + " | ".join(f"{k}-shot: - TA2N (p)" for k in shots)
    lines = [caption, "", head + " |", "|---" * (1 + len(shots) * (2 if REFERENCE in methods
                                                                    else 1)) + "|"]
    for kind in [m for m in LABELS if m in methods]:
        cells = [f"{results[k][kind]['accuracy']:.2f} +- {results[k][kind]['ci95']:.2f}"
                 for k in shots]
        if REFERENCE in methods:
            for k in shots:
                if kind == REFERENCE:
                    cells.append("")
                    continue
                pair = results[k][kind]["versus_ta2n"]
                cells.append(f"{pair['diff']:+.2f} +- {pair['ci95']:.2f} "
                             f"(p={pair['p']:.1g})")
        label = f"**{LABELS[kind]}**" if kind == REFERENCE else LABELS[kind]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty: pass another --out (runs are never overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    if not Path(args.cache).exists():
        print(f"no cache at {args.cache}: writing the default synthetic cache there")
        generate_synthetic(args.cache, SynthConfig(), progress=False)
    print(f"device {device}, torch threads {torch.get_num_threads()}, cache {args.cache}, "
          f"recipe {args.recipe}" + (f" ({args.epochs} x {args.episodes_per_epoch} episodes, "
                                     f"Q={args.queries}, lr {args.lr})"
                                     if args.recipe != "paper" else "")
          + "".join(f", {k} lr {v}" for k, v in learning_rates(args).items()))
    order = ["protonet", *[m for m in args.methods if m != "protonet"]]  # ProtoNet draws
    results: dict[int, dict[str, dict]] = {}
    for shot in args.shots:
        episodes_file = out / f"test-episodes-{shot}shot.json"
        results[shot] = {}
        for kind in order:
            r = run_method(args, kind, shot, episodes_file, device, out)
            results[shot][kind] = r
            print(f"{shot}-shot {LABELS[kind]:<9} {r['accuracy']:6.2f} +- {r['ci95']:.2f}  "
                  f"train {r['train_s']:6.1f} s  evaluate {r['eval_s']:5.1f} s", flush=True)
        if REFERENCE in results[shot]:
            for kind, r in results[shot].items():
                if kind != REFERENCE:
                    r["versus_ta2n"] = paired_versus(results[shot][REFERENCE], r)
    methods = [m for m in LABELS if m in order]
    caption = (f"5-way K-shot test accuracy (%) on {args.cache}, {args.test_episodes} identical "
               f"test episodes per column; {device}")
    table = format_table(results, args.shots, methods, caption)
    print()
    print(table)
    (out / "table2.md").write_text(table + "\n")
    payload = {"args": vars(args), "device": str(device), "threads": torch.get_num_threads(),
               "results": {str(k): {m: {key: v for key, v in r.items()
                                        if key != "episode_accuracy"}
                                    for m, r in v.items()} for k, v in results.items()}}
    (out / "table2.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nwrote {out / 'table2.md'}, {out / 'table2.json'} (runs and reports in {out})")


if __name__ == "__main__":
    main()
