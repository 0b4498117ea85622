"""Benchmark: what each backbone of the registry costs, for the backbone table of docs/results.md.

    python bench/backbones.py                                  # the five table rows, 224 px
    python bench/backbones.py --backbones timm:convnext_tiny --videos 8
    python bench/backbones.py --device cuda --videos 64

For every backbone (random weights: nothing is downloaded; the costs do not depend on the
weights, the compression ratio somewhat does) it runs phase one on the same generated H.264 videos
(``bench/extract_throughput.py``'s, 320x240) at the backbone's own preprocessing and prints:

- the stored map, C x H x W per frame, and MB per video: raw float16 (C x T x H x W x 2 bytes)
  and on disk in the Zarr cache (Blosc zstd-1, these maps);
- extraction frames/s: the whole pipeline (``run_extract``: decode workers, preprocessing,
  batching, forward, writes; after a one-video warm-up run) and the bare backbone (its forward on
  pre-decoded, pre-normalised frames already on the device);
- the heads' training step at that map shape: one TA2N step (forward + backward, fast path,
  training mode), 5-way 1-shot with one query per class, C x T x H x W as stored.

Rows are measured one after the other in one process; compare rows of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract_throughput import bare_rate, write_videos  # noqa: E402
from heads_step import parse_args as head_step_args  # noqa: E402
from heads_step import run_child as head_step  # noqa: E402

from cache import FeatureCache  # noqa: E402
from extract.decode import DecodeTask, decode_task  # noqa: E402
from extract.pipeline import prepare_backbone, run_extract  # noqa: E402
from extract.plan import ExtractConfig, RunPlan, Shard  # noqa: E402

ROWS = ["resnet50", "resnet18", "timm:convnext_tiny", "timm:vit_small_patch16_224",
        "clip:ViT-B-16/openai"]


@contextlib.contextmanager
def quiet():
    """No progress bars or library log lines between the figures."""
    stderr, sys.stderr = sys.stderr, open(os.devnull, "w")
    try:
        yield
    finally:
        sys.stderr.close()
        sys.stderr = stderr


def measure(name: str, args, tmp: Path, lines: list[str], device: torch.device) -> dict:
    """One row: shapes, sizes, bare and pipeline frames/s, head step seconds."""
    config = ExtractConfig(dataset="custom", root=str(tmp / "root"),
                           split_dir=str(tmp / "splits"), out=str(tmp / "cache.zarr"),
                           backbone=name, weights="none", frames=args.frames,
                           image_size=args.image_size, overwrite=True)
    with quiet():
        config, backbone = prepare_backbone(config, device)
    extractor, plan = backbone.extractor, RunPlan.make(config, device)
    crops = np.concatenate([decode_task(DecodeTask(
        i, line, str(tmp / "root" / f"{line}.mp4"), "file", config.frames, resize=config.resize,
        image_size=config.image_size, interpolation=backbone.preprocessing.interpolation),
        "decord").views[0] for i, line in enumerate(lines)])
    inputs = [extractor.normalize(torch.from_numpy(crops[i:i + plan.batch_size]))
              for i in range(0, len(crops), plan.batch_size)]
    bare = bare_rate(extractor, inputs)
    del backbone, extractor, inputs
    with quiet():
        run_extract(ExtractConfig(**{**vars(config), "out": str(tmp / "warm.zarr"), "limit": 1}),
                    device, Shard(), echo=lambda m: None)
        summary = run_extract(config, device, Shard(), echo=lambda m: None)
    with FeatureCache.open(config.out) as cache:
        disk = cache.info()["bytes_on_disk"] / len(cache)
        channels, frames, height, width = cache.shape
    step = head_step(head_step_args([
        "--device", device.type, "--channels", str(channels), "--frames", str(frames),
        "--size", str(height), "--shot", "1", "--queries", "1", "--warmup", "1",
        "--repeats", str(args.head_repeats), "--child", "fast"]))
    return {"name": name, "shape": f"{channels} x {height} x {width}",
            "raw_mb": channels * frames * height * width * 2 / 1e6, "disk_mb": disk / 1e6,
            "pipeline": summary.frames / summary.seconds, "bare": bare,
            "step_s": step["median_s"], "sizes": f"{config.image_size}/{config.resize}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default=",".join(ROWS), help="comma-separated names")
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--video-frames", type=int, default=48)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--head-repeats", type=int, default=1, help="timed head steps per row")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} torch threads"
    print(f"{args.videos} videos x {args.frames} frames at {args.image_size} px, random weights, "
          f"on {where}")
    print("| backbone | C x H x W | MB/video raw fp16 | MB/video on disk | pipeline frames/s "
          "| bare frames/s | ratio | TA2N step s (5-way 1-shot) | crop/resize | row s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lines = write_videos(tmp / "root", args.videos, args.video_frames, 320, 240)
        (tmp / "splits").mkdir()
        (tmp / "splits" / "trainlist.txt").write_text("\n".join(lines) + "\n")
        for name in args.backbones.split(","):
            started = time.perf_counter()
            r = measure(name.strip(), args, tmp, lines, device)
            print(f"| `{r['name']}` | {r['shape']} | {r['raw_mb']:.2f} | {r['disk_mb']:.2f} | "
                  f"{r['pipeline']:.1f} | {r['bare']:.1f} | {r['pipeline'] / r['bare']:.2f} | "
                  f"{r['step_s']:.2f} | {r['sizes']} | {time.perf_counter() - started:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
