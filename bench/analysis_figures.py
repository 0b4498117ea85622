"""The example figures of `python cli.py analyze` (docs/visualize-analyze.md), from synthetic data.

    .venv/bin/python bench/analysis_figures.py [--out docs/figures] [--channels 16] [--epochs 8]

1. misalignment: two synthetic caches with the same 6 classes (the 6 orders of 3 patterns), one
   aligned (every action fills all T frames with linear progress) and one misaligned (random
   windows of at least half of T, progress exponents in [1/2, 2]); `analyze misalignment
   --readout online` on each -> analyze_misalignment_aligned.png, analyze_misalignment.png.
2. embedding: a ta2n head (TTM + TC; --sc adds SC) trained briefly, 5-way 1-shot, on a synthetic
   cache with the `synth` class layout (64 / 16 / 24 classes, sequences of 4 of 4 patterns) at
   C = 16 and 4 x 4 maps -> analyze_embedding.png, t-SNE before / after.
3. compare: protonet and that head evaluated on the same test episodes -> analyze_compare.png.

Everything runs in a scratch folder (--work, default a temporary one), so the caches and runs
it makes never touch caches/latest.json or runs/latest.json of the working directory. Prints the
time of each step and the numbers behind each figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.checkpoints import load_head  # noqa: E402
from align.evaluate import EvalConfig, evaluate  # noqa: E402
from align.models import build_head  # noqa: E402
from align.recipes import TrainConfig  # noqa: E402
from align.reports import compare as cmp  # noqa: E402
from align.reports import embedding as emb
from align.reports import misalignment as mis
from align.train import train  # noqa: E402
from cache import FeatureCache  # noqa: E402
from cache.synthetic import SynthConfig, generate_synthetic  # noqa: E402

CPU = torch.device("cpu")


def step(name: str):
    """Prints how long the step took."""
    class _Timer:
        def __enter__(self):
            self.start = time.perf_counter()
            print(f"--- {name}", flush=True)

        def __exit__(self, *exc):
            print(f"    ({time.perf_counter() - self.start:.1f} s)", flush=True)
    return _Timer()


def misalignment_figures(work: Path, out: Path, channels: int) -> None:
    layout = dict(channels=channels, patterns=3, length=0, train_classes=3, val_classes=1,
                  test_classes=2, videos_per_class=60, noise=0.3, background=0.3, seed=0)
    caches = {"aligned": dict(min_duration=1.0, evolution=1.0),
              "misaligned": dict(min_duration=0.5, evolution=2.0)}
    rows = []
    for name, timing in caches.items():
        path = work / f"synthetic-{name}.zarr"
        with step(f"misalignment: {name} cache (synth {timing})"):
            generate_synthetic(str(path), SynthConfig(**layout, **timing), overwrite=True,
                               progress=False)
            summary = mis.run_misalignment(str(path), str(work / f"misalignment-{name}"),
                                         mis.MisalignmentConfig(readout="online"), CPU)
        target = out / ("analyze_misalignment.png" if name == "misaligned"
                        else "analyze_misalignment_aligned.png")
        shutil.copy(summary["files"]["histogram"], target)
        st = summary["start_time"]
        rows.append(f"    {name:<11} AEM {summary['aem']:.4f}  start {st['mean']:.2f} +- "
                    f"{st['std']:.2f}  never {st['never_reached']}/{summary['videos']}  held-out "
                    f"video accuracy {summary['classifier']['heldout_video_accuracy']:.1f}%"
                    f"  -> {target}")
    print("\n".join(rows))


def trained_head(cache: str, work: Path, args) -> str:
    """A ta2n head (TTM + TC unless --sc) trained briefly: SGD, lr halved every epochs/2."""
    cfg = TrainConfig(cache=cache, head="ta2n", head_options={"sc": args.sc},
                      way=5, shot=1, queries=5,
                      recipe="paper", epochs=args.epochs, episodes_per_epoch=100, lr=args.lr,
                      lr_step=max(1, args.epochs // 2),
                      lr_gamma=0.5, val_every=args.epochs, val_episodes=100, preload="ram",
                      workers=1, out=str(work / "run-ta2n"))
    summary = train(cfg, device=CPU, log=lambda s: None, progress=False)
    losses = [f"{row['train_loss']:.1f}" for row in summary["history"]]
    print(f"    train loss per epoch {', '.join(losses)}; val {summary['best_val_acc']:.2f}")
    return summary["best"]


def embedding_and_compare_figures(work: Path, out: Path, args) -> None:
    path = str(work / "synthetic.zarr")
    layout = dict(channels=args.channels, size=4, patterns=4, length=4, train_classes=64,
                  val_classes=16, test_classes=24, videos_per_class=20, min_duration=0.5,
                  evolution=2.0, noise=0.3, background=0.3, seed=0)
    with step(f"synthetic cache {layout}"):
        generate_synthetic(path, SynthConfig(**layout), overwrite=True, progress=False)
    stages = "TTM + TC + SC" if args.sc else "TTM + TC"
    with step(f"train ta2n ({stages}) 5-way 1-shot, {args.epochs} epochs x 100 episodes"):
        checkpoint = trained_head(path, work, args)
    head = load_head(checkpoint, shot=1)
    with FeatureCache.open(path) as cache:
        c, t, h, w = cache.shape
        with step("embedding: 10 test episodes, 5-way 1-shot, 5 queries per class"):
            summary = emb.run_embedding(cache, head, str(work / "embedding"), emb.EmbeddingConfig(),
                                      CPU, f"ta2n {stages}, trained", progress=False)
        shutil.copy(summary["files"]["figure"], out / "analyze_embedding.png")
        print(emb.format_embedding(summary))
        reports = {}
        protonet = build_head("protonet", channels=c, frames=t, height=h, width=w, shot=1)
        for name, model in (("protonet", protonet), ("ta2n", head)):
            with step(f"evaluate {name} on {args.eval_episodes} test episodes (seed 0)"):
                reports[name] = str(work / f"eval-{name}.json")
                result = evaluate(model, cache, EvalConfig(shot=1, episodes=args.eval_episodes,
                                                           preload="ram", workers=1),
                                  device=CPU, head_config=asdict(model.config),
                                  report=reports[name], progress=False)
                print(f"    {result['summary']}")
    with step("compare protonet -> ta2n"):
        summary = cmp.run_compare(reports["protonet"], reports["ta2n"], str(work / "compare"))
    shutil.copy(summary["files"]["figure"], out / "analyze_compare.png")
    print(cmp.format_compare(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/figures", help="Where the PNGs go.")
    parser.add_argument("--work", default=None, help="Scratch folder [default: a temporary one].")
    parser.add_argument("--channels", type=int, default=16, help="C of the synthetic caches.")
    parser.add_argument("--epochs", type=int, default=8, help="Training epochs of the ta2n head.")
    parser.add_argument("--lr", type=float, default=0.03, help="Its learning rate.")
    parser.add_argument("--sc", action="store_true", help="Train it with SC too (slower).")
    parser.add_argument("--eval-episodes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these sizes on a shared CPU).")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="analysis-figures-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    os.chdir(work)  # generate_synthetic and train remember their outputs under the cwd
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; scratch {work}")
    misalignment_figures(work, out, args.channels)
    with threadpool_limits(args.threads):  # t-SNE's OpenMP threads
        embedding_and_compare_figures(work, out, args)
    print(f"figures in {out}")


if __name__ == "__main__":
    main()
