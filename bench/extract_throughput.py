"""Benchmark: frames/s of the whole extract pipeline versus the bare backbone, on the same inputs.

    python bench/extract_throughput.py                       # 40 videos, resnet50, 224, on auto
    python bench/extract_throughput.py --device cuda --videos 200
    python bench/extract_throughput.py --backbone resnet18 --videos 16   # a quick look
    python bench/extract_throughput.py --device cuda --decoder gpu      # NVDEC decoding

It writes its own input videos (H.264, 320x240, ``--video-frames`` each) into a temporary
folder, and uses a randomly initialised backbone (no download). Then it measures

- bare: the backbone's forward alone on pre-decoded, pre-normalised frames already on the
  device, in batches of the pipeline's batch size (the ceiling the pipeline can reach);
- pipeline: ``run_extract`` on the same videos - decode workers, preprocessing, batching,
  forward, compression and cache writes - from the first task to the last row written (after a
  short warm-up run, so that worker processes and the backbone are warm, as in a long run);

and prints both rates and their ratio (goal: >= 0.85 on CPU, >= 0.9 on a GPU). The bare rate is
measured before and after the pipeline, and the mean is used, to damp a shared machine's noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.backbone import FeatureExtractor  # noqa: E402
from extract.decode import DecodeTask, decode_task  # noqa: E402
from extract.gpu_decode import choose_decoder  # noqa: E402
from extract.pipeline import run_extract  # noqa: E402
from extract.plan import ExtractConfig, RunPlan, Shard  # noqa: E402
from extract.resnet_backbone import load_backbone  # noqa: E402


def write_videos(root: Path, count: int, frames: int, width: int, height: int) -> list[str]:
    """``count`` H.264 clips of moving noise in 4 classes, and the split-list lines naming them."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        video_id = f"class{i % 4}/clip{i:03d}"
        path = root / f"{video_id}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        image = np.kron(base, np.ones((8, 8, 1), np.uint8))
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for t in range(frames):
                frame = av.VideoFrame.from_ndarray(np.roll(image, 4 * t, axis=1), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        lines.append(video_id)
    return lines


def bare_rate(extractor: FeatureExtractor, inputs: list[torch.Tensor]) -> float:
    """Frames/s of the forward pass alone over pre-normalised batches already on the device."""
    extractor.forward_input(inputs[0])  # warm-up: kernels, allocator
    sync = torch.cuda.synchronize if extractor.cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for x in inputs:
        extractor.forward_input(x)
    sync()
    return sum(len(x) for x in inputs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--video-frames", type=int, default=48)
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the generated videos")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--decoder", default="cpu", choices=["auto", "cpu", "gpu"],
                        help="extract --decoder of the pipeline run (the bare rate's frames are "
                             "always decoded by decord)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    width, height = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"writing {args.videos} videos ({args.video_frames} frames, {width}x{height}) ...")
        lines = write_videos(tmp / "root", args.videos, args.video_frames, width, height)
        (tmp / "splits").mkdir()
        (tmp / "splits" / "trainlist.txt").write_text("\n".join(lines) + "\n")
        config = ExtractConfig(
            dataset="custom", root=str(tmp / "root"), split_dir=str(tmp / "splits"),
            out=str(tmp / "bench.zarr"), backbone=args.backbone, weights="none",
            frames=args.frames, image_size=args.image_size, resize=args.resize,
            batch_size=args.batch_size, workers=args.workers,
            decoder=choose_decoder(args.decoder))  # says which, once; the runs then agree
        plan = RunPlan.make(config, device)

        # Pre-decoded inputs for the bare backbone: the same frames the pipeline will take.
        trunk, _ = load_backbone(args.backbone, "none")
        extractor = FeatureExtractor(trunk, device)
        crops = np.concatenate([
            decode_task(DecodeTask(i, line, str(tmp / "root" / f"{line}.mp4"), "file",
                                   args.frames, resize=args.resize,
                                   image_size=args.image_size), "decord").views[0]
            for i, line in enumerate(lines)])
        inputs = [extractor.normalize(torch.from_numpy(crops[i:i + plan.batch_size]))
                  for i in range(0, len(crops), plan.batch_size)]
        before = bare_rate(extractor, inputs)

        warm = ExtractConfig(**{**vars(config), "out": str(tmp / "warm.zarr"), "limit": 2})
        stderr, sys.stderr = sys.stderr, open(os.devnull, "w")  # no progress bars in the figures
        try:
            run_extract(warm, device, Shard(), echo=lambda m: None)
            wall = time.perf_counter()
            summary = run_extract(config, device, Shard(), echo=lambda m: None)
            wall = time.perf_counter() - wall
        finally:
            sys.stderr.close()
            sys.stderr = stderr
        after = bare_rate(extractor, inputs)

    bare = (before + after) / 2
    pipeline = summary.frames / summary.seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} torch threads"
    print(f"device      {device} ({name})")
    print(f"setup       {args.backbone}, {args.videos} videos x {args.frames} frames at "
          f"{args.image_size}px, batch {plan.batch_size} frames, {plan.workers} decode workers")
    print(f"bare        {bare:8.1f} frames/s  (before {before:.1f}, after {after:.1f})")
    print(f"pipeline    {pipeline:8.1f} frames/s  ({summary.extracted} videos in "
          f"{summary.seconds:.1f} s; {wall:.1f} s with set-up)")
    print(f"decoder     {config.decoder}: {len(summary.fallbacks)} videos fell back to the CPU "
          f"decoders, {len(summary.failed)} failed")
    print(f"ratio       {pipeline / bare:8.3f}  (goal >= {0.9 if device.type == 'cuda' else 0.85})")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": name, "backbone": args.backbone, "videos": args.videos,
            "frames": args.frames, "image_size": args.image_size, "batch": plan.batch_size,
            "workers": plan.workers, "bare_frames_per_s": round(bare, 1),
            "pipeline_frames_per_s": round(pipeline, 1), "ratio": round(pipeline / bare, 3),
            "wall_s": round(wall, 1), "decoder": config.decoder,
            "fallbacks": len(summary.fallbacks), "failed": len(summary.failed)},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
