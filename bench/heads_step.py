"""Benchmark one TA2N training step at full size: the direct form against the fast path.

    python bench/heads_step.py [--device auto|cpu|cuda] [--repeats 3] [--warmup 1]
                               [--channels 2048] [--frames 8] [--size 7]
                               [--way 5] [--shot 5] [--queries 5] [--sc-mode mask]

One step = forward + cross-entropy + backward of one episode (default 5-way 5-shot, 5 queries
per class, C=2048, T=8, 7x7 maps, training mode: SC perturbation and BatchNorm batch statistics
on). Each form runs in its own subprocess so that peak memory is its own: on CPU the peak
resident set size (ru_maxrss) and its rise over the RSS before the first step (inputs and
weights already in memory); on CUDA ``torch.cuda.max_memory_allocated`` over the steps. Prints
median seconds per step for both forms, the speed-up, and the peak memory; the fast path must
match the direct form (checked on the logits of the first step).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from align.models import build_head  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per form")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=7, help="H = W of the maps")
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--queries", type=int, default=5, help="queries per class")
    parser.add_argument("--sc-mode", default="mask", choices=["mask", "grid"])
    parser.add_argument("--child", choices=["direct", "fast"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def rss_mib() -> float:
    """Current resident set size of this process (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def run_child(args: argparse.Namespace) -> dict:
    """Time ``args.repeats`` steps of one form; return times, memory and the first logits."""
    device = pick_device(args.device)
    gen = torch.Generator().manual_seed(0)
    size = (args.channels, args.frames, args.size, args.size)
    support = torch.randn(args.way * args.shot, *size, generator=gen).relu().to(device)
    query = torch.randn(args.way * args.queries, *size, generator=gen).relu().to(device)
    labels = torch.arange(args.way).repeat_interleave(args.queries).to(device)
    head = build_head("ta2n", channels=args.channels, frames=args.frames, height=args.size,
                      width=args.size, shot=args.shot, sc_mode=args.sc_mode,
                      fast=args.child == "fast", seed=0).to(device).train()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> torch.Tensor:
        logits = head(support, query, args.way, args.shot)  # (M, way)
        F.cross_entropy(logits, labels).backward()
        head.zero_grad(set_to_none=True)
        return logits.detach()

    rss_before = rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = None
    for _ in range(args.warmup):
        logits = step()
        first = logits if first is None else first
    sync()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        logits = step()
        sync()
        times.append(time.perf_counter() - start)
        first = logits if first is None else first
    result = {"form": args.child, "device": str(device), "times": times,
              "median_s": statistics.median(times), "logits": first.cpu().tolist()}
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["device_name"] = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
        result.update(peak_mib=peak, step_peak_mib=peak - rss_before)
        result["threads"] = torch.get_num_threads()
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    passthrough = list(argv if argv is not None else sys.argv[1:])
    results = {}
    for form in ("direct", "fast"):
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--child", form],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{form} step failed:\n{proc.stderr}")
        results[form] = json.loads(proc.stdout.strip().splitlines()[-1])
    direct, fast = results["direct"], results["fast"]
    diff = (torch.tensor(direct["logits"]) - torch.tensor(fast["logits"])).abs().max().item()
    where = direct.get("device_name") or f"{direct['device']} ({direct.get('threads')} threads)"
    print(f"TA2N step (forward + backward), {args.way}-way {args.shot}-shot, "
          f"{args.way * args.queries} queries, C={args.channels} T={args.frames} "
          f"{args.size}x{args.size}, sc={args.sc_mode}, on {where}; "
          f"median of {args.repeats} after {args.warmup} warm-up")
    for form in ("direct", "fast"):
        r = results[form]
        memory = f"peak {r['peak_mib']:.0f} MiB"
        if "step_peak_mib" in r:
            memory += f" (step adds {r['step_peak_mib']:.0f} MiB over inputs + weights)"
        print(f"  {form:6s} {r['median_s']:8.3f} s/step   {memory}")
    print(f"  speed-up fast vs direct: {direct['median_s'] / fast['median_s']:.2f}x   "
          f"max |logit difference| {diff:.2e}")


if __name__ == "__main__":
    main()
