"""Benchmark one TA2N training step at full size: today's fast path against the factored path,
with the FLOPs of both.

    python bench/heads_step.py [--device auto|cpu|cuda] [--rounds 2] [--repeats 2] [--warmup 1]
                               [--channels 2048] [--frames 8] [--size 7] [--way 5] [--shot 5]
                               [--queries 5] [--sc-mode mask] [--micro-batch 4]
                               [--forms maps,factored,factored-mb] [--json FILE]

One step = forward + cross-entropy + backward of one episode (default 5-way 5-shot, 5 queries
per class, C=2048, T=8, 7x7 maps, training mode: SC perturbation and BatchNorm batch statistics
on). The forms (``TA2NHead.set_path``): "direct" (the authors' form), "maps" (the fast path
before issue 12: first conv split by input, einsum pooling, Wv' after the shot mix), "factored"
(one episode per pass) and "factored-mb" (``--micro-batch`` episodes per pass, time per
episode). Each form runs in its own subprocess, so that peak memory is its own: on CPU the peak
resident set size (ru_maxrss) and its rise over the RSS before the first step; on CUDA
``torch.cuda.max_memory_allocated``. The subprocesses alternate for ``--rounds`` rounds (a
shared machine's load changes), and the median over all timed steps is reported, in wall-clock
seconds and in the process's CPU seconds (``time.process_time``: on a machine shared with
other jobs the wall clock also counts the time the threads waited for a core; the CPU time
does not, so its ratio is the steadier one).

FLOPs are counted by ``torch.utils.flop_counter`` on meta tensors (shapes only, no compute), for
1- and 5-shot: a training step, an evaluation episode (1 query per class) of today's path, and
the factored evaluation: per-video precompute (per video, in chunks of 64) and per-episode
scoring.
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
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from align.models import build_head  # noqa: E402
from cli import pick_device  # noqa: E402

FORMS = ("direct", "maps", "factored", "factored-mb")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternations of the forms (0: the FLOP table only)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per form and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=7, help="H = W of the maps")
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--queries", type=int, default=5, help="queries per class")
    parser.add_argument("--sc-mode", default="mask", choices=["mask", "grid", "enumerate"])
    parser.add_argument("--micro-batch", type=int, default=4, help="episodes per pass of "
                        "factored-mb")
    parser.add_argument("--forms", default="maps,factored,factored-mb",
                        help=f"comma-separated, of {','.join(FORMS)}; the first is the baseline")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP table")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--child", choices=FORMS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def rss_mib() -> float:
    """Current resident set size of this process (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def make_head(args, path: str, shot: int, device) -> torch.nn.Module:
    head = build_head("ta2n", channels=args.channels, frames=args.frames, height=args.size,
                      width=args.size, shot=shot, sc_mode=args.sc_mode, seed=0)
    return head.set_path(path).to(device)


def run_child(args: argparse.Namespace) -> dict:
    """Time the steps of one form; return seconds per episode, memory and the first logits."""
    device = pick_device(args.device)
    episodes = args.micro_batch if args.child == "factored-mb" else 1
    path = "factored" if args.child == "factored-mb" else args.child
    gen = torch.Generator().manual_seed(0)
    size = (args.channels, args.frames, args.size, args.size)
    support = torch.randn(1, args.way * args.shot, *size, generator=gen).relu()
    query = torch.randn(1, args.way * args.queries, *size, generator=gen).relu()
    support = support.expand(episodes, *support.shape[1:]).contiguous().to(device)
    query = query.expand(episodes, *query.shape[1:]).contiguous().to(device)
    labels = torch.arange(args.way).repeat_interleave(args.queries).repeat(episodes).to(device)
    head = make_head(args, path, args.shot, device).train()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> torch.Tensor:
        logits = head.forward_episodes(support, query, args.way, args.shot)  # (E, M, way)
        F.cross_entropy(logits.flatten(0, 1), labels, reduction="sum").backward()
        head.zero_grad(set_to_none=True)
        return logits[0].detach()

    rss_before = rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = None
    for _ in range(args.warmup):
        first = step() if first is None else first
        sync()
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        logits = step()
        sync()
        times.append((time.perf_counter() - start) / episodes)
        cpu_times.append((time.process_time() - cpu_start) / episodes)
        first = logits if first is None else first
    result = {"form": args.child, "device": str(device), "episodes_per_pass": episodes,
              "times": times, "cpu_times": cpu_times, "logits": first.cpu().tolist()}
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["device_name"] = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
        result.update(peak_mib=peak, step_peak_mib=peak - rss_before)
        result["threads"] = torch.get_num_threads()
    return result


# ------------------------------------------------------------------------------ FLOPs
def count(fn, *args) -> float:
    """GFLOP of ``fn(*args)`` (on meta tensors)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() / 1e9


def train_step_flops(head, support, query, way, shot) -> float:
    return count(lambda: head.forward_episodes(support, query, way, shot).sum().backward())


def flop_table(args) -> list[dict]:
    """GFLOP of a training step, an evaluation episode and the factored evaluation's parts."""
    meta = torch.device("meta")
    size = (args.channels, args.frames, args.size, args.size)
    rows = []
    for shot in (1, 5):
        row: dict = {"shot": shot}
        s = torch.empty(1, args.way * shot, *size, device=meta)
        q_train = torch.empty(1, args.way * args.queries, *size, device=meta)
        q_eval = torch.empty(1, args.way, *size, device=meta)
        for path in ("maps", "factored"):
            head = make_head(args, path, shot, meta).train()
            row[f"train_{path}"] = train_step_flops(head, s, q_train, args.way, shot)
        e = args.micro_batch
        row["train_factored_mb"] = train_step_flops(
            make_head(args, "factored", shot, meta).train(), s.expand(e, *s.shape[1:]),
            q_train.expand(e, *q_train.shape[1:]), args.way, shot) / e
        with torch.no_grad():
            head = make_head(args, "maps", shot, meta).eval()
            row["eval_maps"] = count(head.forward_episodes, s, q_eval, args.way, shot)
            head = make_head(args, "factored", shot, meta).eval()
            chunk = torch.empty(64, *size, device=meta)
            row["precompute_per_video"] = count(head.precompute, chunk, shot) / 64
            states_s = {k: v[None] for k, v in head.precompute(s[0], shot).items()}
            states_q = {k: v[None] for k, v in head.precompute(q_eval[0], shot).items()}
            row["score_per_episode"] = count(head.score_episodes, states_s, states_q, args.way,
                                             shot)
        rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def print_flops(rows: list[dict], args) -> None:
    print(f"GFLOP (torch.utils.flop_counter), {args.way}-way, C={args.channels} T={args.frames} "
          f"{args.size}x{args.size}, sc={args.sc_mode}:")
    for r in rows:
        print(f"  {r['shot']}-shot train step ({args.way * args.queries} queries): today "
              f"{r['train_maps']:.1f} -> factored {r['train_factored']:.1f} "
              f"({r['train_factored_mb']:.1f} per episode at {args.micro_batch} per pass)")
        print(f"  {r['shot']}-shot eval episode ({args.way} queries): today {r['eval_maps']:.1f}"
              f" -> factored {r['score_per_episode']:.2f} per episode + "
              f"{r['precompute_per_video']:.2f} once per video")


# ------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    unknown = sorted(set(forms) - set(FORMS))
    if unknown:
        sys.exit(f"unknown forms {unknown}; choose from {FORMS}")
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    steps = report_steps(args, forms, passthrough) if args.rounds > 0 else None
    flops = None if args.no_flops else flop_table(args)
    if flops:
        print_flops(flops, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": steps, "flops": flops}, indent=1))


def report_steps(args, forms: list[str], passthrough: list[str]) -> dict:
    """Run the forms' subprocesses alternately and print their medians, ratios and memory."""
    results: dict[str, list[dict]] = {f: [] for f in forms}
    for _ in range(args.rounds):
        for form in forms:
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--child", form],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{form} step failed:\n{proc.stderr}")
            results[form].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = {f: summarise(r) for f, r in results.items()}
    base = forms[0]
    first = results[base][0]
    where = first.get("device_name") or f"{first['device']} ({first.get('threads')} threads)"
    print(f"TA2N training step (forward + backward), {args.way}-way {args.shot}-shot, "
          f"{args.way * args.queries} queries, C={args.channels} T={args.frames} "
          f"{args.size}x{args.size}, sc={args.sc_mode}, on {where}; median of "
          f"{args.rounds} rounds x {args.repeats} steps after {args.warmup} warm-up per form")
    for form in forms:
        s = summary[form]
        memory = f"peak {s['peak_mib']:.0f} MiB"
        if "step_peak_mib" in s:
            memory += f" (step adds {s['step_peak_mib']:.0f} MiB over inputs + weights)"
        diff = (torch.tensor(results[form][0]["logits"]) -
                torch.tensor(first["logits"])).abs().max().item()
        ratio = summary[base]["median_s"] / s["median_s"]
        cpu_ratio = summary[base]["median_cpu_s"] / s["median_cpu_s"]
        print(f"  {form:12s} {s['median_s']:8.3f} s/episode  x{ratio:.2f} vs {base}   "
              f"(CPU time {s['median_cpu_s']:.3f} s, x{cpu_ratio:.2f})   {memory}"
              f"   max |logit diff| {diff:.1e}")
    return summary


def summarise(runs: list[dict]) -> dict:
    times = [t for r in runs for t in r["times"]]
    cpu_times = [t for r in runs for t in r["cpu_times"]]
    out = {"median_s": statistics.median(times), "times": times,
           "median_cpu_s": statistics.median(cpu_times), "cpu_times": cpu_times,
           "peak_mib": max(r["peak_mib"] for r in runs),
           "episodes_per_pass": runs[0]["episodes_per_pass"]}
    if "step_peak_mib" in runs[0]:
        out["step_peak_mib"] = max(r["step_peak_mib"] for r in runs)
    return out


if __name__ == "__main__":
    main()
