"""What compact caches cost in accuracy: `sweep heads` on a cache and on its int8 / bfloat16 copies.

    python bench/compact_caches.py                         # C = 32 synthetic cache, small budget
    python bench/compact_caches.py --cache caches/demo.zarr --episodes 1000 --set epochs=10
    python bench/compact_caches.py --store-dtypes int8 --seeds 0,1,2
    python bench/compact_caches.py --cache f16.zarr --compare int8=i8.zarr --compare bfloat16=b.zarr

The source cache (default: a synthetic one it makes, ``--channels`` C) is copied with
``cache.recode`` to every ``--store-dtypes`` (same rows, labels and splits, so every sweep draws
identical episodes per seed); ``--compare NAME=PATH`` takes an existing cache instead (e.g. one
made by ``extract --store-dtype``: it must hold the same videos in the same order, checked).
``python cli.py sweep heads`` then trains and tests the same heads
and seeds on each cache (``--set`` options for every run: the training budget), and this script
pairs every compact run with the source's run of the same head and seed: the mean accuracy
difference in points (reports give percent) over all seeds' episodes, its 95% t-interval and p
(paired t-test on identical episodes, ``align.stats.paired_test``) and whether that interval
lies within +-0.3 points (issue 26's goal). It deletes only the folder it makes under ``--dir``
unless ``--keep``. Read rates per stored dtype: ``bench/cache_io.py --only-store-dtypes``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align.stats import paired_test  # noqa: E402
from cache import FeatureCache  # noqa: E402
from cache.recode import recode  # noqa: E402
from cache.synthetic import SynthConfig, generate_synthetic  # noqa: E402

DEFAULT_SET = ("epochs=2", "episodes-per-epoch=60", "val-episodes=0")
GOAL_POINTS = 0.3  # issue 26: a compact cache within 0.3 accuracy points of float16


def sweep(cache: Path, out: Path, args) -> dict[tuple[str, int], np.ndarray]:
    """Run `sweep heads` on ``cache`` into ``out``; per (head, seed) the per-episode accuracy."""
    command = [sys.executable, str(ROOT / "cli.py"), "sweep", "heads", "--cache", str(cache),
               "--heads", args.heads, "--seeds", args.seeds, "--shots", str(args.shot),
               "--episodes", str(args.episodes), "--devices", "cpu", "--threads", "1",
               "--out", str(out)]
    for option in args.set:
        command += ["--set", option]
    subprocess.run(command, check=True, cwd=out.parent, stdout=subprocess.DEVNULL)
    accuracy = {}
    for run in json.loads((out / "sweep.json").read_text())["runs"]:
        report = json.loads((out / run["run_dir"] / "eval.json").read_text())
        accuracy[(run["head"], int(run["seed"]))] = np.asarray(report["episode_accuracy"])
    return accuracy


def check_same_videos(source: Path, other: Path) -> None:
    """Refuse a comparison cache whose videos, labels or splits differ from the source's (the
    episodes would then differ, and the paired test would pair unrelated episodes)."""
    with FeatureCache.open(source) as a, FeatureCache.open(other) as b:
        for field in ("video_ids", "labels", "splits"):
            if not np.array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field))):
                sys.exit(f"{other}: its {field} differ from {source}'s: not the same videos")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=None,
                        help="Source cache (default: a synthetic one of --channels C).")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--store-dtypes", default="int8,bfloat16")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=PATH",
                        help="An existing cache to compare with the source instead of a recoded "
                             "copy (same videos, same order); replaces --store-dtypes.")
    parser.add_argument("--heads", default="ta2n,protonet,otam")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--episodes", type=int, default=300, help="Test episodes per seed.")
    parser.add_argument("--set", action="append", default=None,
                        help=f"train-heads option for every run (default: {' '.join(DEFAULT_SET)})")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ta2n-compact-bench"))
    parser.add_argument("--keep", action="store_true", help="Keep the caches and runs.")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    args.set = args.set or list(DEFAULT_SET)

    work = args.dir / "compact_caches"  # the only thing this script deletes
    if work.exists():
        sys.exit(f"{work} exists: remove it or pass another --dir")
    work.mkdir(parents=True)
    started = time.perf_counter()
    try:
        source = Path(args.cache) if args.cache else work / "source.zarr"
        if not args.cache:
            generate_synthetic(str(source), SynthConfig(channels=args.channels), progress=False)
        caches = {"source": source}
        if args.compare:
            for given in args.compare:
                name, path = given.split("=", 1)
                caches[name] = Path(path)
                check_same_videos(source, caches[name])
        else:
            for name in args.store_dtypes.split(","):
                caches[name] = Path(recode(source, work / f"{name}.zarr", store_dtype=name))
        sizes = {}
        for name, path in caches.items():
            with FeatureCache.open(path) as cache:
                info = cache.info()
                sizes[name] = (info["store_dtype"], info["bytes_on_disk"] / max(info["done"], 1))
        results = {name: sweep(path, work / f"sweep-{name}", args)
                   for name, path in caches.items()}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"source {args.cache or f'synthetic C={args.channels}'}; heads {args.heads}; seeds "
          f"{args.seeds}; {args.shot}-shot; {args.episodes} test episodes per seed; "
          f"{' '.join(args.set)}; {time.perf_counter() - started:.0f} s")
    for name, (dtype, per_row) in sizes.items():
        print(f"  {name:<9} stored {dtype:<9} {per_row / 1024:8.1f} KB per video on disk")
    print(f"\n{'head':<10}{'stored':<10}{'accuracy':>10}{'source':>9}{'diff (points)':>15}"
          f"{'95% CI':>18}{'p':>8}  within 0.3")
    figures = []
    for head in args.heads.split(","):
        seeds = sorted(s for h, s in results["source"] if h == head)
        base = np.concatenate([results["source"][(head, s)] for s in seeds])
        for name in caches:
            if name == "source":
                continue
            other = np.concatenate([results[name][(head, s)] for s in seeds])
            test = paired_test(base, other)
            figures.append({"head": head, "stored": name, "accuracy": float(other.mean()),
                            "source_accuracy": float(base.mean()), **test})
            interval = f"[{test['ci_low']:+.2f}, {test['ci_high']:+.2f}]"
            within = -GOAL_POINTS <= test["ci_low"] and test["ci_high"] <= GOAL_POINTS
            figures[-1]["within_goal"] = within
            print(f"{head:<10}{name:<10}{other.mean():>10.2f}{base.mean():>9.2f}"
                  f"{test['gain']:>+15.2f}{interval:>18}{test['p']:>8.3f}  "
                  f"{'yes' if within else 'no'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": sizes, "rows": figures}, indent=1))


if __name__ == "__main__":
    main()
