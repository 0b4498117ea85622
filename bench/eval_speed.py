"""Evaluation speed: today's per-episode path against per-video precompute + per-pair scoring,
through ``align.evaluate.run_episodes``, on the same episodes.

    python bench/eval_speed.py                                   # the issue's setting, CPU
    python bench/eval_speed.py --device cuda --episodes 5000 --baseline-episodes 500
    python bench/eval_speed.py --channels 64 --episodes 200      # a quick look

It writes a synthetic test split (``--classes`` x ``--videos-per-class`` videos, C=2048, 8 x 7 x
7 by default) into a temporary cache and draws ``--episodes`` N-way K-shot episodes with one
query per class. The head is TA2N with seeded weights; its zero-started last layers get seeded
weights too, so that TTM warps and SC shifts are not the identity. Each path runs in its own
subprocess (its own peak memory), on the split preloaded in RAM (or on the GPU):

- today: the "maps" path (``TA2NHead.set_path("maps")``, the fast path before issue 12),
  ``--batch-episodes`` episodes per forward pass, timed on the first ``--baseline-episodes``
  episodes: it shares nothing between episodes, so its rate is the same for any number of them
  (timing all 2000 at full size would take hours on a 2-core CPU);
- precomputed: the factored path on all ``--episodes`` episodes: per-video states of every
  video the episodes use, then ``--batch-episodes`` episodes per scoring call; the precompute
  is included in its time.

Both exclude loading the split and a warm-up call. Prints episodes/s of both and their ratio
(goal >= 10x on the 2-core CPU), the precompute and scoring seconds, peak memory, and whether
both predicted the same classes on the shared episodes. GPU timings synchronize before reading
the clock.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.episodes import EpisodeSampler, Stream  # noqa: E402
from align.evaluate import run_episodes, sync  # noqa: E402
from align.feed import Feeder  # noqa: E402
from align.models import build_head  # noqa: E402
from cache import FeatureCache  # noqa: E402
from cache.synthetic import SynthConfig, generate_synthetic  # noqa: E402
from cli import pick_device  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--episodes", type=int, default=2000)
    p.add_argument("--baseline-episodes", type=int, default=40,
                   help="episodes today's path is timed on (the first ones)")
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shot", type=int, default=5)
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=7, help="H = W")
    p.add_argument("--classes", type=int, default=24, help="test classes")
    p.add_argument("--videos-per-class", type=int, default=40)
    p.add_argument("--batch-episodes", type=int, default=16)
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--cache", default=None, help="use this cache (else a temporary one)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--child", choices=["today", "precomputed"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def seeded_head(args, path: str):
    """TA2N with seeded weights, its zero-started last layers (TTM, SC) awake."""
    head = build_head("ta2n", channels=args.channels, frames=args.frames, height=args.size,
                      width=args.size, shot=args.shot, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for last in (head.ttm.locnet[-2], head.sc.mvnet[-2]):
            last.weight.copy_(torch.randn(last.weight.shape, generator=gen) * 0.5)
    return head.set_path(path)


def run_child(args) -> dict:
    device = pick_device(args.device)
    with FeatureCache.open(args.cache) as cache:
        sampler = EpisodeSampler(cache, "test", way=args.way, shot=args.shot, queries=1,
                                 seed=0, stream=Stream.TEST)
        count = args.baseline_episodes if args.child == "today" else args.episodes
        episodes = sampler.episodes(0, count)
        feeder = Feeder(cache, "test", device=device, preload="auto", progress=False)
        head = seeded_head(args, "maps" if args.child == "today" else "factored").to(device)
        common = dict(device=device, batch_episodes=args.batch_episodes, amp=not args.no_amp,
                      progress=False)
        run_episodes(head, feeder, episodes[:1], **common)  # warm-up: kernels, allocator
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss_before, said, timing = rss_mib(), [], {}
        sync(device)
        start = time.perf_counter()
        preds = run_episodes(head, feeder, episodes, log=said.append, timing=timing, **common)
        sync(device)
        seconds = time.perf_counter() - start
    result = {"path": args.child, "episodes": count, "seconds": seconds,
              "episodes_per_s": count / seconds, "precompute_s": timing["precompute_s"],
              "score_s": timing["score_s"], "preds": preds.tolist(), "log": said,
              "feeder": feeder.reason}
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["where"] = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result.update(peak_mib=peak, rise_mib=peak - rss_before,
                      where=f"cpu, {torch.get_num_threads()} threads")
    return result


def child(args, name: str, passthrough: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *passthrough, "--cache", args.cache,
                           "--child", name], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    with tempfile.TemporaryDirectory() as tmp:
        if args.cache is None:
            args.cache = str(Path(tmp) / "eval-bench.zarr")
            start = time.perf_counter()
            generate_synthetic(args.cache, SynthConfig(
                channels=args.channels, frames=args.frames, size=args.size, train_classes=0,
                val_classes=0, test_classes=args.classes,
                videos_per_class=args.videos_per_class, seed=0), progress=False)
            print(f"synthetic test split: {args.classes} classes x {args.videos_per_class} "
                  f"videos, C={args.channels} T={args.frames} {args.size}x{args.size} "
                  f"({time.perf_counter() - start:.0f} s to write)")
        today = child(args, "today", passthrough)
        new = child(args, "precomputed", passthrough)
    shared = min(today["episodes"], new["episodes"])
    same = np.array_equal(np.asarray(today["preds"][:shared]), np.asarray(new["preds"][:shared]))
    ratio = new["episodes_per_s"] / today["episodes_per_s"]
    print(f"{args.way}-way {args.shot}-shot, 1 query per class, on {new['where']}; "
          f"{new['feeder']}")
    print(f"  today       {today['episodes_per_s']:9.3f} episodes/s  ({today['episodes']} "
          f"episodes in {today['seconds']:.1f} s)   peak {today['peak_mib']:.0f} MiB")
    print(f"  precomputed {new['episodes_per_s']:9.3f} episodes/s  ({new['episodes']} episodes "
          f"in {new['seconds']:.1f} s: precompute {new['precompute_s']:.1f} s + scoring "
          f"{new['score_s']:.1f} s)   peak {new['peak_mib']:.0f} MiB")
    for line in new["log"]:
        print(f"    {line}")
    print(f"  ratio       {ratio:9.1f}x  (goal >= 10x)   same predictions on the {shared} "
          f"shared episodes: {same}")
    if args.json:
        figures = {k: {x: v for x, v in r.items() if x != "preds"} for k, r in
                   (("today", today), ("precomputed", new))}
        Path(args.json).write_text(json.dumps({**figures, "ratio": ratio, "same": same},
                                              indent=1))


if __name__ == "__main__":
    main()
