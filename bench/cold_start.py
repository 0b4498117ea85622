"""Time from a cold start (a fresh Python process) to the first training episode, streaming rows
from the cache (``--preload none``) versus loading the train split into RAM first (``ram``).

    python bench/cold_start.py                                   # 10,000 rows at C=2048 (16 GB)
    python bench/cold_start.py --rows 10000 --channels 256       # same row count, 2 GB
    python bench/cold_start.py --cache caches/ucf101.zarr        # an existing cache

Without ``--cache`` it writes a synthetic cache of ``--rows`` rows (about half in `train`) into a
temporary folder. Each measurement runs in a new process and reports, from the process start:
imports done, cache opened, episode sampler built (reads the index and the done flags), feeder
ready (preload: the whole split read), first episode's maps served; then, separately, the time
from calling ``align.train.train`` to its first finished training episode (everything again:
open, sampler, feeder, one forward + backward of the head). The OS page cache is whatever it
is (warm right after writing the cache); with ``--drop-caches`` the script asks the kernel to
drop it before each run (needs root, says if it could not).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time, json
start = float(sys.argv[1]); cache_path, mode, device = sys.argv[2], sys.argv[3], sys.argv[4]
marks = {}
def mark(name):
    marks[name] = round(time.time() - start, 3)
sys.path.insert(0, sys.argv[5])
import numpy as np, torch
from align.episodes import EpisodeSampler
from align.feed import Feeder
from align.recipes import TrainConfig
from align.train import train
from cache import FeatureCache
mark("imports")
cache = FeatureCache.open(cache_path)
mark("opened")
sampler = EpisodeSampler(cache, "train", way=5, shot=1, queries=5, seed=0)
mark("sampler")
feeder = Feeder(cache, "train", device=torch.device(device), preload=mode, progress=False)
mark("feeder")
e = sampler.episode(0)
maps = feeder.load(np.concatenate([e.support, e.query]))
mark("first_episode_maps")
del feeder
t0 = time.time()
def hook(epoch, episode):
    marks["train_call_to_first_episode"] = round(time.time() - t0, 3)
cfg = TrainConfig(cache=cache_path, shot=1, epochs=1, episodes_per_epoch=1, val_episodes=0,
                  preload=mode, out=sys.argv[6])
train(cfg, device=torch.device(device), progress=False, log=lambda m: None, on_episode=hook)
print(json.dumps({"marks": marks}))
"""


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def make_cache(path: str, rows: int, channels: int, frames: int, size: int) -> None:
    sys.path.insert(0, str(ROOT))
    from cache.synthetic import SynthConfig, generate_synthetic

    classes = (12, 5, 7)
    generate_synthetic(path, SynthConfig(
        channels=channels, frames=frames, size=size, train_classes=classes[0],
        val_classes=classes[1], test_classes=classes[2],
        videos_per_class=math.ceil(rows / sum(classes)), seed=0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=None, help="an existing cache (else a synthetic one)")
    p.add_argument("--rows", type=int, default=10000)
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", nargs="+", default=["none", "ram"])
    p.add_argument("--drop-caches", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache_path = args.cache
        if cache_path is None:
            cache_path = str(Path(tmp) / "cold.zarr")
            t = time.time()
            make_cache(cache_path, args.rows, args.channels, args.frames, args.size)
            print(f"wrote {cache_path} ({args.rows} rows requested, C={args.channels}) "
                  f"in {time.time() - t:.0f} s")
        info = subprocess.run([sys.executable, str(ROOT / "cli.py"), "info", cache_path],
                              capture_output=True, text=True, cwd=tmp).stdout
        print(info)
        for mode in args.modes:
            dropped = drop_page_cache() if args.drop_caches else None
            start = time.time()
            out = subprocess.run([sys.executable, "-c", CHILD, str(start), cache_path, mode,
                                  args.device, str(ROOT), str(Path(tmp) / f"run-{mode}")],
                                 capture_output=True, text=True, cwd=tmp)
            if out.returncode != 0:
                print(out.stderr[-2000:])
                raise SystemExit(f"the {mode} run failed")
            marks = json.loads(out.stdout.strip().splitlines()[-1])["marks"]
            cache_note = {None: "", True: ", page cache dropped",
                          False: ", page cache NOT dropped (no permission)"}[dropped]
            print(f"preload {mode:<4}{cache_note}: " + "  ".join(
                f"{k} {v:.2f}s" for k, v in marks.items()))


if __name__ == "__main__":
    main()
