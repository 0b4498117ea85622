"""How long `analyze misalignment` takes to fit its held-out classifiers at dataset scale.

    .venv/bin/python bench/misalignment_speed.py [--videos 13320] [--classes 101] [--channels 2048]
        [--frames 8] [--readout frame] [--folds 5] [--device auto]

The pooled (n, T, C) frame features are random here (reading and pooling a real cache is the
cache's read speed, see bench/cache_io.py); what is timed is the k-fold softmax regression and the
start-time / AEM computation, the part that grows with videos x channels x classes. Defaults:
UCF101's size (13,320 videos, 101 classes) with ResNet-50 maps (C = 2048), T = 8.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.reports import misalignment as mis  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=13320)
    parser.add_argument("--classes", type=int, default=101)
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--readout", default="frame", choices=mis.READOUTS)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device(args.device if args.device != "auto"
                          else "cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    labels = rng.integers(args.classes, size=args.videos)
    centres = rng.standard_normal((args.classes, args.channels)).astype(np.float32)
    frames = rng.standard_normal((args.videos, args.frames, args.channels), dtype=np.float32)
    frames += 0.3 * centres[labels][:, None]  # a learnable signal, so L-BFGS does real work
    cfg = mis.MisalignmentConfig(readout=args.readout, folds=args.folds, max_iter=args.max_iter)
    print(f"{args.videos} videos x T={args.frames} x C={args.channels}, {args.classes} classes, "
          f"{args.readout} readout, {args.folds} folds, device {device} "
          f"({torch.get_num_threads()} CPU threads)")
    start = time.perf_counter()
    probs = mis.heldout_frame_probabilities(frames, labels, args.classes, cfg, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    fit = time.perf_counter() - start
    p_true = np.take_along_axis(probs, labels[:, None, None], axis=2)[..., 0]
    start = time.perf_counter()
    starts, aem = mis.start_times(p_true), mis.aem_score(p_true)
    measure = time.perf_counter() - start
    print(f"classifiers {fit:.1f} s ({fit / args.folds:.1f} s per fold), start times + AEM "
          f"{measure * 1000:.1f} ms; held-out frame accuracy "
          f"{(probs.argmax(-1) == labels[:, None]).mean():.1%}, AEM {aem:.4f}, "
          f"never started {(starts < 0).sum()}")


if __name__ == "__main__":
    main()
