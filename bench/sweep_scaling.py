"""A sweep serially vs on a local Dask cluster (`sweep --scheduler local:N`), on this CPU.

    .venv/bin/python bench/sweep_scaling.py                    # 8 TA2N runs, local:2
    .venv/bin/python bench/sweep_scaling.py --seeds 4 --workers 2 --epochs 2

The sweep: one trained TA2N row (the default head) for --seeds seeds on a synthetic cache (C =
--channels, T = 8, 4 x 4), one torch thread per run, the same saved test episodes; all runs cost
the same, so N workers can at best divide the time by N. Both sweeps run in this process (its
imports already warm): first serially, then as tasks on a fresh local cluster of --workers
processes, whose start (scheduler, worker processes, their imports, the shared-filesystem
check) counts in its wall time. Printed: both wall times, their ratio, the cluster's start-up
(until the first run starts on a worker) and the per-task overhead: worker-seconds per run
beyond the serial run's time, ((wall - start-up) x workers - serial) / runs. On a machine shared
with other jobs the wall figures measure the contention as much as Dask, so the CPU seconds of
each sweep (this process and its children: client, scheduler, worker processes with their
imports) are printed too, and the CPU overhead per run, (cluster CPU - serial CPU) / runs, which
the load moves far less. The two CSVs are checked equal (timings apart); the 1-minute load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.sweep import TIMING_FIELDS, SweepConfig, parse_spec, run_sweep  # noqa: E402
from cache.synthetic import SynthConfig, generate_synthetic  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="runs (one per seed)")
    parser.add_argument("--workers", type=int, default=2, help="local cluster's processes")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--episodes-per-epoch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--work", default=None, help="folder (default: a temporary one)")
    return parser.parse_args(argv)


def spec(args: argparse.Namespace):
    return parse_spec({"title": "scaling", "run": [{
        "name": "ta2n", "head": "ta2n", "epochs": args.epochs,
        "episodes_per_epoch": args.episodes_per_epoch, "val_episodes": 4, "queries": 2,
        "tasks_per_batch": 2}]}, "bench")


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the cluster's workers
    count once the cluster is closed)."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_sweep(args, cache: str, out: Path, scheduler: str | None
                ) -> tuple[float, float, float]:
    """(wall seconds, seconds until the first run started, CPU seconds)."""
    cpu = cpu_seconds()
    start = time.perf_counter()
    first = []

    def log(line: str) -> None:
        if " started on " in line and not first:
            first.append(time.perf_counter() - start)

    cfg = SweepConfig(cache=cache, out=str(out), seeds=tuple(range(args.seeds)), episodes=100,
                      devices=("cpu",), threads=1, scheduler=scheduler)
    run_sweep(spec(args), cfg, log=log)
    return time.perf_counter() - start, first[0], cpu_seconds() - cpu


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_FIELDS}
                for row in csv.DictReader(f)]


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="sweep-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    cache = str(work / "bench.zarr")
    if not Path(cache).exists():
        generate_synthetic(cache, SynthConfig(channels=args.channels, frames=8, size=4,
                                              videos_per_class=8, seed=0), progress=False)
    load_before = os.getloadavg()[0]
    stamp = time.strftime("%H%M%S")
    serial, _, serial_cpu = timed_sweep(args, cache, work / f"serial-{stamp}", None)
    cluster, startup, cluster_cpu = timed_sweep(args, cache, work / f"local-{stamp}",
                                                f"local:{args.workers}")
    load_after = os.getloadavg()[0]
    same = (read_csv(work / f"serial-{stamp}" / "sweep.csv")
            == read_csv(work / f"local-{stamp}" / "sweep.csv"))
    overhead = ((cluster - startup) * args.workers - serial) / args.seeds
    print(f"sweep: {args.seeds} TA2N runs ({args.epochs} epochs x {args.episodes_per_epoch} "
          f"episodes, C = {args.channels}), 1 torch thread per run; {os.cpu_count()} CPUs")
    print(f"serial            {serial:7.1f} s")
    print(f"local:{args.workers}           {cluster:7.1f} s  (start-up until the first run: "
          f"{startup:.1f} s)")
    print(f"speed-up          {serial / cluster:7.2f} x  ({serial / (cluster - startup):.2f} x "
          f"without the start-up; at most {args.workers} x)")
    print(f"per-task overhead {overhead:7.2f} s of worker time per run "
          f"(serial: {serial / args.seeds:.2f} s per run)")
    print(f"CPU               {serial_cpu:7.1f} s serial, {cluster_cpu:.1f} s local:{args.workers}"
          f": {(cluster_cpu - serial_cpu) / args.seeds:.2f} CPU s per run more "
          f"(serial: {serial_cpu / args.seeds:.2f} CPU s per run)")
    print(f"same CSV          {same} (timings apart)")
    print(f"load average      {load_before:.1f} before, {load_after:.1f} after (1 min)")
    if not same:
        raise SystemExit("the cluster's sweep.csv differs from the serial one")


if __name__ == "__main__":
    main()
