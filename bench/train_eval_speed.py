"""Episodes per second of training and of evaluation through the real code paths, and what a
paper-length run would take.

    python bench/train_eval_speed.py --device cpu                     # full size, 1- and 5-shot
    python bench/train_eval_speed.py --device cuda --train-episodes 50 --eval-episodes 500
    python bench/train_eval_speed.py --channels 256 --train-episodes 4  # a quick look

For each K it writes a small synthetic cache of the asked size (C, T, H = W) into a temporary
folder, then times
  - training: ``align.train.train`` (feeding, dropout, head forward + backward, SGD with gradient
    accumulation), one timestamp per episode from its ``on_episode`` hook; warm-up episodes
    are left out;
  - evaluation: ``align.evaluate.evaluate`` (Q = 1 query per class, ``--batch-episodes`` episodes
    per forward pass), after a warm-up evaluation;
  - FLOPs of one training episode (forward + backward) and one evaluation episode, counted by
    ``torch.utils.flop_counter`` on the real head.
The paper-length estimate (``--epochs`` x ``--episodes-per-epoch`` training episodes, validation
every ``--val-every`` epochs on ``--val-episodes`` episodes, then ``--test-episodes`` test
episodes) is given twice: from the measured rates on this device, and for a GPU from the counts:
FLOPs at an assumed sustained throughput (``--gpu-tflops``, default 100 TFLOP/s: about a quarter
of an H100's dense bf16 peak) plus an assumed fixed cost per operator (``--launch-us``, default
10 us of kernel launch and eager overhead) - an estimate, not a measurement; run the script with
``--device cuda`` on a GPU to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from align.checkpoints import load_head  # noqa: E402
from align.evaluate import EvalConfig, evaluate  # noqa: E402
from align.models import build_head  # noqa: E402
from align.recipes import TrainConfig  # noqa: E402
from align.train import train  # noqa: E402
from cache import FeatureCache  # noqa: E402
from cache.synthetic import SynthConfig, generate_synthetic  # noqa: E402
from cli import pick_device  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OpCounter(TorchDispatchMode):
    """Counts the aten operators an episode runs: on a GPU, each is at least one kernel launch."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def episode_cost(head, channels, frames, size, way, shot, queries, train_mode) -> tuple[int, int]:
    """(FLOPs, aten ops) of one episode: forward + backward in training, forward in evaluation."""
    support = torch.randn(way * shot, channels, frames, size, size)
    query = torch.randn(way * queries, channels, frames, size, size)
    head = head.cpu().train(train_mode)
    with FlopCounterMode(display=False) as counter, OpCounter() as ops:
        if train_mode:
            head(support, query, way, shot).sum().backward()
        else:
            with torch.no_grad():
                head(support, query, way, shot)
    head.zero_grad(set_to_none=True)
    return counter.get_total_flops(), ops.ops


def bench_shot(args, shot: int, device: torch.device, folder: Path) -> dict:
    queries = args.queries
    cache_path = str(folder / f"bench-{shot}shot.zarr")
    need = shot + max(queries, 1)
    generate_synthetic(cache_path, SynthConfig(
        channels=args.channels, frames=args.frames, size=args.size, patterns=4,
        train_classes=args.way, val_classes=args.way, test_classes=args.way,
        videos_per_class=need + 1, seed=0), progress=False)

    # training through align.train.train, one timestamp per episode
    stamps: list[float] = []

    def stamp(epoch, episode):
        sync(device)
        stamps.append(time.perf_counter())

    total = args.warmup + args.train_episodes
    cfg = TrainConfig(cache=cache_path, shot=shot, way=args.way, queries=queries, epochs=1,
                      episodes_per_epoch=total, tasks_per_batch=16, val_episodes=0,
                      preload=args.preload,
                      amp=not args.no_amp, out=str(folder / f"run-{shot}shot"))
    train(cfg, device=device, progress=False, log=lambda m: None, on_episode=stamp)
    timed = stamps[args.warmup:]
    train_s = (timed[-1] - stamps[args.warmup - 1]) / len(timed) if args.warmup else \
        (timed[-1] - timed[0]) / max(1, len(timed) - 1)

    # evaluation through align.evaluate.evaluate (batched episodes), after a warm-up
    head = load_head(folder / f"run-{shot}shot" / "best.pt")
    with FeatureCache.open(cache_path) as cache:
        common = dict(shot=shot, way=args.way, batch_episodes=args.batch_episodes,
                      preload=args.preload, amp=not args.no_amp)
        evaluate(head, cache, EvalConfig(episodes=min(args.batch_episodes, 4), **common),
                 device=device, progress=False)
        result = evaluate(head, cache, EvalConfig(episodes=args.eval_episodes, **common),
                          device=device, progress=False)
    eval_s = 1.0 / result["episodes_per_s"]

    fresh = dict(channels=args.channels, frames=args.frames, height=args.size, width=args.size,
                 shot=shot)
    sizes = (args.channels, args.frames, args.size, args.way, shot)
    train_flops, train_ops = episode_cost(build_head("ta2n", **fresh), *sizes, queries, True)
    eval_flops, eval_ops = episode_cost(build_head("ta2n", **fresh), *sizes, 1, False)
    n_train = args.epochs * args.episodes_per_epoch
    n_val = (args.epochs // args.val_every) * args.val_episodes
    measured = n_train * train_s + (n_val + args.test_episodes) * eval_s
    # GPU model: compute at the assumed throughput plus a fixed cost per operator (launch and
    # eager overhead); evaluation batches --batch-episodes episodes, sharing the launches
    gpu, launch = args.gpu_tflops * 1e12, args.launch_us * 1e-6
    gpu_train = train_flops / gpu + train_ops * launch
    gpu_eval = eval_flops / gpu + eval_ops * launch / args.batch_episodes
    return {
        "shot": shot, "device": str(device),
        "train_episode_s": round(train_s, 4), "train_episodes_per_s": round(1 / train_s, 3),
        "eval_episode_s": round(eval_s, 5), "eval_episodes_per_s": round(1 / eval_s, 2),
        "train_episode_gflop": round(train_flops / 1e9, 2),
        "eval_episode_gflop": round(eval_flops / 1e9, 3),
        "achieved_train_tflops": round(train_flops / train_s / 1e12, 3),
        "paper_run_here_h": round(measured / 3600, 2),
        "train_episode_ops": train_ops, "eval_episode_ops": eval_ops,
        "paper_train_gpu_min_est": round(n_train * gpu_train / 60, 2),
        "paper_val_gpu_min_est": round(n_val * gpu_eval / 60, 2),
        "test_5000_gpu_s_est": round(args.test_episodes * gpu_eval, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=7, help="H = W")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--queries", type=int, default=5, help="Q per class in training")
    p.add_argument("--warmup", type=int, default=1, help="training episodes not timed")
    p.add_argument("--train-episodes", type=int, default=3)
    p.add_argument("--eval-episodes", type=int, default=16)
    p.add_argument("--batch-episodes", type=int, default=8)
    p.add_argument("--preload", default="auto")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--epochs", type=int, default=200, help="paper-length run: epochs")
    p.add_argument("--episodes-per-epoch", type=int, default=200)
    p.add_argument("--val-every", type=int, default=5)
    p.add_argument("--val-episodes", type=int, default=500)
    p.add_argument("--test-episodes", type=int, default=5000)
    p.add_argument("--gpu-tflops", type=float, default=100.0,
                   help="assumed sustained GPU throughput for the FLOP-based estimate")
    p.add_argument("--launch-us", type=float, default=10.0,
                   help="assumed GPU cost per operator (kernel launch, eager overhead), in us")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print(f"device {device}  C={args.channels} T={args.frames} H=W={args.size}  "
          f"{args.way}-way, Q={args.queries} train / 1 eval, threads={torch.get_num_threads()}")
    results = []
    home = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # train() records runs/latest.json in the working directory: keep it here
        for shot in args.shots:
            r = bench_shot(args, shot, device, Path(tmp))
            results.append(r)
            print(f"{args.way}-way {shot}-shot  train {r['train_episodes_per_s']:.3f} ep/s "
                  f"({r['train_episode_s']:.3f} s, {r['train_episode_gflop']} GFLOP, "
                  f"{r['achieved_train_tflops']} TFLOP/s achieved)  "
                  f"eval {r['eval_episodes_per_s']:.2f} ep/s ({r['eval_episode_gflop']} GFLOP)")
            print(f"    paper-length run ({args.epochs}x{args.episodes_per_epoch} train, "
                  f"val every {args.val_every} on {args.val_episodes}, "
                  f"{args.test_episodes} test) at these rates: {r['paper_run_here_h']:.2f} h")
            print(f"    GPU estimate ({args.gpu_tflops:g} TFLOP/s sustained, {args.launch_us:g} us "
                  f"x {r['train_episode_ops']} ops per training episode): train "
                  f"{r['paper_train_gpu_min_est']:.1f} min + val "
                  f"{r['paper_val_gpu_min_est']:.1f} min; {args.test_episodes} test episodes "
                  f"{r['test_5000_gpu_s_est']:.1f} s")
        os.chdir(home)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
