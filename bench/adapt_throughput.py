"""Benchmark: adapt-backbone's training throughput here, and what adaptation costs on a GPU.

    python bench/adapt_throughput.py                      # resnet18 @ 112 and resnet50 @ 224
    python bench/adapt_throughput.py --rows resnet50:224 --steps 3 --device cuda

For each backbone and crop size it runs adapt-backbone's own training step (the TSN classifier
of ``extract.adapt_model``: B videos x T frames -> backbone -> spatial mean -> linear -> logits
averaged over T -> cross-entropy -> backward -> AdamW) on random input, after one warm-up step, and
prints:

- training frames/s (wall) and CPU seconds per frame (user + sys of this process): on a machine
  shared with other jobs the wall rate is theirs to decide, the CPU time much less so (with
  ``OMP_WAIT_POLICY=PASSIVE``, idle OpenMP threads do not spin), and cores / CPU s per frame is
  the rate a quiet machine gives;
- training FLOPs per frame (forward + backward, counted by torch.utils.flop_counter) and the
  sustained GFLOP/s that makes;
- for docs/results.md's cost table: frames one adaptation reads with the dataset's default recipe
  (train videos less the 10 % held out, x T = 8, x epochs), the hours on this machine's cores
  at the CPU-time rate, and
  ESTIMATED GPU hours at an assumed sustained rate (``--gpu-tflops``, 50 and 100 by default) -
  FLOPs divided by throughput, not a measurement.

Decoding is not in these figures (the pipeline decodes in worker processes, in parallel with the
backbone); on a GPU it can bound the rate: see docs/results.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.adapt import adaptation_recipe  # noqa: E402
from extract.adapt_model import TSNClassifier  # noqa: E402
from extract.backbones import parse_backbone  # noqa: E402
from extract.datasets import SPLITS_DIR, dataset_spec  # noqa: E402

DATASETS = ("ucf101", "hmdb51", "ssv2", "kinetics")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="resnet18:112,resnet50:224",
                        help="backbone:crop pairs, comma-separated")
    parser.add_argument("--videos", type=int, default=4, help="videos per step")
    parser.add_argument("--frames", type=int, default=8, help="T")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--gpu-tflops", default="50,100",
                        help="assumed sustained TFLOP/s of the GPU estimates")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def train_frames(dataset: str, frames: int = 8, held_out: float = 0.1) -> int:
    """Frames one adaptation with the dataset's default recipe reads."""
    folder = SPLITS_DIR / dataset_spec(dataset).split_folder
    lines = (folder / "trainlist03.txt").read_text().split()
    return round(len(lines) * (1 - held_out)) * frames * adaptation_recipe(dataset)["epochs"]


def measure(name: str, size: int, args, device: torch.device) -> dict:
    """Frames/s, CPU s per frame and FLOPs per frame of the adaptation training step."""
    trunk, _ = parse_backbone(name).load("none", 0, size)
    trunk.train().requires_grad_(True)
    channels = 2048 if name in ("resnet50", "resnet101", "resnet152") else 512
    model = TSNClassifier(trunk, channels, 64, torch.Generator().manual_seed(0)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.videos, args.frames, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, 64, (args.videos,), generator=gen).to(device)

    def step():
        loss = F.cross_entropy(model(x), y)  # (B, K) logits averaged over T
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()  # also the warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    frames = args.steps * args.videos * args.frames
    flops = counter.get_total_flops() / (args.videos * args.frames)
    return {"name": name, "size": size, "fps": frames / wall, "cpu_per_frame": cpu / frames,
            "gflop_per_frame": flops / 1e9, "gflops": flops * frames / wall / 1e9}


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    print(f"adapt-backbone training step on {device} ({torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), "
          f"{args.videos} videos x T={args.frames} per step, {args.steps} timed steps")
    rows = [measure(n, int(s), args, device)
            for n, s in (r.split(":") for r in args.rows.split(","))]
    print(f"\n{'backbone':<10} {'crop':>5} {'frames/s':>9} {'CPU s/frame':>12} "
          f"{'GFLOP/frame':>12} {'GFLOP/s':>8}")
    for r in rows:
        print(f"{r['name']:<10} {r['size']:>5} {r['fps']:9.2f} {r['cpu_per_frame']:12.3f} "
              f"{r['gflop_per_frame']:12.2f} {r['gflops']:8.1f}")
    rates = [float(t) for t in args.gpu_tflops.split(",")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for r in rows:
        print(f"{r['name']} @ {r['size']}: {cores / r['cpu_per_frame']:.1f} frames/s on {cores} "
              "quiet cores (from the CPU time)")
    print(f"\nOne adaptation with the default recipe (T = 8, 10 % held out): hours on {cores} "
          "quiet cores here (from the CPU time), and estimated GPU hours:")
    print(f"{'dataset':<9} {'frames':>10} " + " ".join(
        f"{r['name'] + '@' + str(r['size']) + ' CPU h':>18}" for r in rows) + "   "
        + " ".join(f"{'GPU h @' + format(t, 'g') + ' TFLOP/s (est.)':>26}" for t in rates))
    for dataset in DATASETS:
        frames = train_frames(dataset)
        here = " ".join(f"{frames * r['cpu_per_frame'] / cores / 3600:18.0f}" for r in rows)
        big = rows[-1]
        gpu = " ".join(f"{frames * big['gflop_per_frame'] * 1e9 / (t * 1e12) / 3600:26.2f}"
                       for t in rates)
        print(f"{dataset:<9} {frames:>10} {here}   {gpu}")
    print(f"(GPU estimates for the last row, {rows[-1]['name']} @ {rows[-1]['size']}: FLOPs / "
          "assumed throughput, not measured)")


if __name__ == "__main__":
    main()
