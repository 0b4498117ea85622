"""Phase one stage by stage: each stage alone and the whole ``run_extract``, on the same videos.

    python bench/extract_stages.py                    # resnet50 @ 224 and resnet18 @ 112, CPU
    python bench/extract_stages.py --setups resnet18@112 --videos 24
    python bench/extract_stages.py --device cuda --videos 160 --json stages.json
    python bench/extract_stages.py --small            # seconds: the test suite's size

It writes its own H.264 videos (moving noise, ``--size`` 320x240 like UCF101, ``--video-frames``
each) into a temporary folder and uses randomly initialised backbones (``--weights none``: no
download). For every setup (backbone @ image size) it measures, with the settings ``run_extract``
would use (``RunPlan``: batch size, decode workers, writer threads, codec):

- decode: the decode workers alone (decode + resize + crop, ``DecodePool``), no backbone;
- backbone: the forward pass alone on pre-decoded, pre-normalised frames already on the device
  (measured before and after the pipeline; the mean is used, to damp a shared machine's noise);
- write: rows encoded and written alone (``FeatureCache.write_row``: codec, checksums, done
  flags) from the backbone's own maps, by the plan's writer threads;
- pipeline: the whole ``run_extract`` (after a two-video warm-up run, so that worker processes and
  the backbone are warm, as in a long run);
- with ``--baseline``, in the same rounds: the pipeline as it was before issue 26 (on a CPU one
  decode worker per 8 cores and partial batches; rows written through zarr's event loop), and the
  decode stage with its worker count, for a before / after in one run.

It prints each stage's rate in frames/s and MB/s (decode: video file bytes read; backbone: maps
made, in the cache dtype; write: raw row bytes stored), the stage that bounds, and the pipeline's
share of the slowest stage and of the serial bound 1 / (sum of 1 / stage rate) - what one core
doing every stage in turn would reach. Goals (issue 26): on a CPU, where the stages share the
cores, resnet50 >= 0.9 of its backbone alone and resnet18 @ 112 >= 0.9 of the serial bound; on a
GPU, where the stages run on different hardware, >= 0.8 of the slowest stage.
"""


import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from extract_throughput import bare_rate, write_videos  # noqa: E402

from cache import FeatureCache  # noqa: E402
from cache.zarr_store import ZarrBackend  # noqa: E402
from extract.backbone import FeatureExtractor  # noqa: E402
from extract.decode import DecodedVideo, DecodePool, DecodeTask  # noqa: E402
from extract.pipeline import prepare_backbone, run_extract  # noqa: E402
from extract.plan import ExtractConfig, RunPlan, Shard  # noqa: E402

# backbone@image_size:videos - enough frames for each to run tens of seconds on a 2-core CPU
SETUPS = ("resnet50@224:16", "resnet18@112:96")
CPU_GOALS = {"resnet50": ("backbone", 0.9)}  # others: the serial bound
CPU_DEFAULT_GOAL = ("serial", 0.9)
GPU_GOAL = ("slowest", 0.8)


@dataclass
class Stages:
    """One setup's measured rates (frames/s) per stage and of the whole pipeline, one entry per
    round; shares are per-round ratios (stages and pipeline measured minutes apart on a shared
    machine are not comparable), summarised by their median."""

    setup: str
    videos: int
    frames: int  # frames per video through the backbone (all views)
    batch: int
    workers: int
    writers: int
    codec: str
    rates: dict[str, list[float]]  # stage -> frames/s per round
    mb_per_frame: dict[str, float]  # stage -> MB it handles per frame
    pipeline: list[float]  # frames/s per round
    row_mb_on_disk: float
    baseline: list[float] | None = None  # the pipeline before issue 26, frames/s per round
    baseline_decode: list[float] | None = None  # the decode stage with its workers

    def rate(self, stage: str) -> float:
        return float(np.median(self.rates[stage]))

    @property
    def slowest(self) -> str:
        return min(self.rates, key=self.rate)

    def _bounds(self, of: str) -> np.ndarray:
        rates = {k: np.asarray(v) for k, v in self.rates.items()}
        if of == "serial":
            return 1.0 / sum(1.0 / r for r in rates.values())
        return rates[self.slowest if of == "slowest" else of]

    def bound(self, of: str) -> float:
        return float(np.median(self._bounds(of)))

    def share(self, of: str) -> float:
        """Median over rounds of pipeline / bound (``of``: serial, slowest or a stage)."""
        return float(np.median(np.asarray(self.pipeline) / self._bounds(of)))

    def baseline_share(self) -> dict[str, float]:
        """The pipeline before issue 26 against the same stages (its own decode workers in the
        serial bound), and the pipeline now over it - medians of per-round ratios."""
        before, now = np.asarray(self.baseline), np.asarray(self.pipeline)
        rates = {**{k: np.asarray(v) for k, v in self.rates.items()},
                 "decode": np.asarray(self.baseline_decode)}
        serial = 1.0 / sum(1.0 / r for r in rates.values())
        return {"frames_per_s": float(np.median(before)),
                "share_of_serial": float(np.median(before / serial)),
                "share_of_backbone": float(np.median(before / rates["backbone"])),
                "now_over_before": float(np.median(now / before))}

    def to_json(self) -> dict:
        return {"setup": self.setup, "videos": self.videos, "frames_per_video": self.frames,
                "batch": self.batch, "workers": self.workers, "writers": self.writers,
                "codec": self.codec, "rounds": len(self.pipeline),
                "stage_frames_per_s": {k: round(self.rate(k), 2) for k in self.rates},
                "stage_mb_per_s": {k: round(self.rate(k) * self.mb_per_frame[k], 2)
                                   for k in self.rates},
                "pipeline_frames_per_s": round(float(np.median(self.pipeline)), 2),
                "serial_bound_frames_per_s": round(self.bound("serial"), 2),
                "bound_by": self.slowest,
                "share_of_slowest": round(self.share("slowest"), 3),
                "share_of_serial": round(self.share("serial"), 3),
                "share_of_backbone": round(self.share("backbone"), 3),
                "row_mb_on_disk": round(self.row_mb_on_disk, 4),
                **({"before_issue_26": {k: round(v, 3) for k, v in self.baseline_share().items()}}
                   if self.baseline else {})}


def quiet(fn):
    """Run ``fn()`` with stderr (progress bars) silenced."""
    stderr, sys.stderr = sys.stderr, open(os.devnull, "w")
    try:
        return fn()
    finally:
        sys.stderr.close()
        sys.stderr = stderr


def decode_stage(tasks: list[DecodeTask], plan: RunPlan) -> tuple[float, list[DecodedVideo]]:
    """Seconds for the decode workers alone to turn ``tasks`` into crops, and the crops."""
    pool = DecodePool(workers=plan.workers, timeout=plan.timeout, nice=plan.nice)
    list(pool.imap(tasks[:1]))  # warm-up: the forkserver and the decoders' imports
    start = time.perf_counter()
    decoded = list(pool.imap(tasks))
    seconds = time.perf_counter() - start
    failed = [d for d in decoded if not isinstance(d, DecodedVideo)]
    if failed:
        raise SystemExit(f"decoding failed: {failed[0]}")
    return seconds, sorted(decoded, key=lambda d: d.row)


@contextlib.contextmanager
def plan_before_issue_26():
    """``run_extract`` as it was before issue 26: on a CPU one decode worker per 8 cores (at
    least one) and partial batches, and every row write through zarr's event loop."""
    make, row_writes = RunPlan.make, ZarrBackend._row_writes

    def old_make(config: ExtractConfig, device: torch.device) -> RunPlan:
        plan = make(config, device)
        if device.type == "cuda":
            return plan
        workers = old_cpu_workers() if config.workers is None else config.workers
        return replace(plan, workers=workers, partial_batches=True)

    RunPlan.make, ZarrBackend._row_writes = old_make, lambda self, name: False
    try:
        yield
    finally:
        RunPlan.make, ZarrBackend._row_writes = make, row_writes


def old_cpu_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) // 8)


def backbone_inputs(extractor: FeatureExtractor, decoded: list[DecodedVideo],
                    batch: int) -> list[torch.Tensor]:
    crops = np.concatenate([d.views.reshape(-1, *d.views.shape[2:]) for d in decoded])
    return [extractor.normalize(torch.from_numpy(crops[i:i + batch]))
            for i in range(0, len(crops), batch)]


def video_rows(extractor: FeatureExtractor, inputs: list[torch.Tensor], frames: int) -> np.ndarray:
    """The backbone's maps as cache rows (n, C, T, h, w), in the cache dtype."""
    maps = torch.cat([extractor.forward_input(x).cpu() for x in inputs])  # (n*T, C, h, w)
    maps = maps.view(-1, frames, *maps.shape[1:]).permute(0, 2, 1, 3, 4)  # (n, C, T, h, w)
    return maps.contiguous().numpy()


def write_stage(folder: Path, rows: np.ndarray, config: ExtractConfig,
                plan: RunPlan) -> tuple[float, float]:
    """Seconds for the plan's writer threads to write ``rows`` into a fresh cache (as extract
    creates it), and the bytes per row on disk."""
    n = len(rows)
    path = folder / "write-stage.zarr"
    with FeatureCache.create(path, video_ids=[f"c/v{i}" for i in range(n)],
                             splits=["train"] * n, labels=[0] * n, classes=["c"],
                             shape=rows.shape[1:], dtype=config.dtype, backend=config.backend,
                             overwrite=True, codec=config.codec,
                             store_dtype=config.store_dtype) as cache, \
            ThreadPoolExecutor(plan.writers) as pool:
        start = time.perf_counter()
        list(pool.map(lambda i: cache.write_row(i, rows[i]), range(n)))
        seconds = time.perf_counter() - start
        on_disk = cache.info()["bytes_on_disk"] / n
    return seconds, on_disk


def parse_setup(text: str, videos: int) -> tuple[str, int, int]:
    """'resnet18@112:96' -> ('resnet18', 112, 96); the video count defaults to ``videos``."""
    setup, _, count = text.strip().partition(":")
    backbone, _, size = setup.partition("@")
    return backbone, int(size), int(count or videos)


def measure(backbone_name: str, size: int, root: Path, split_dir: Path, work: Path, args,
            device: torch.device) -> Stages:
    setup = f"{backbone_name}@{size}"
    config = ExtractConfig(
        dataset="custom", root=str(root), split_dir=str(split_dir), out=str(work / "run.zarr"),
        backbone=backbone_name, weights="none", frames=args.frames, image_size=size,
        resize=args.resize, batch_size=args.batch_size, workers=args.workers,
        writers=args.writers, codec=args.codec, store_dtype=args.store_dtype)
    config, backbone = prepare_backbone(config, device)
    plan = RunPlan.make(config, device)
    lines = (split_dir / "trainlist.txt").read_text().split()
    tasks = [DecodeTask(i, line, str(root / f"{line}.mp4"), "file", config.frames,
                        resize=config.resize, image_size=config.image_size,
                        interpolation=backbone.preprocessing.interpolation)
             for i, line in enumerate(lines)]
    video_mb = sum(os.path.getsize(t.path) for t in tasks) / 2**20

    extractor = backbone.extractor
    warm = replace(config, out=str(work / "warm.zarr"), limit=2)
    quiet(lambda: run_extract(warm, device, Shard(), echo=lambda m: None))
    rates: dict[str, list[float]] = {"decode": [], "backbone": [], "write": []}
    pipeline, baseline, baseline_decode = [], [], []
    for _ in range(args.rounds):
        decode_s, decoded = decode_stage(tasks, plan)
        inputs = backbone_inputs(extractor, decoded, plan.batch_size)
        frames = sum(len(x) for x in inputs)
        rates["decode"].append(frames / decode_s)
        rates["backbone"].append(bare_rate(extractor, inputs))
        run = replace(config, overwrite=True)
        summary = quiet(lambda r=run: run_extract(r, device, Shard(), echo=lambda m: None))
        if summary.frames != frames:
            raise SystemExit(f"the pipeline made {summary.frames} frames, the stages {frames}")
        pipeline.append(summary.frames / summary.seconds)
        if args.baseline:
            with plan_before_issue_26():
                before = quiet(lambda r=run: run_extract(r, device, Shard(), echo=lambda m: None))
                old = RunPlan.make(config, device)
            baseline.append(before.frames / before.seconds)
            baseline_decode.append(frames / decode_stage(tasks, old)[0]
                                   if old.workers != plan.workers else rates["decode"][-1])
        rows = video_rows(extractor, inputs, config.frames)
        write_s, row_bytes = write_stage(work, rows, config, plan)
        rates["write"].append(frames / write_s)
    per_frame = {"decode": video_mb / frames, "backbone": rows.nbytes / 2**20 / frames,
                 "write": rows.nbytes / 2**20 / frames}
    return Stages(setup, len(tasks), config.frames, plan.batch_size, plan.workers, plan.writers,
                  config.codec, rates, per_frame, pipeline, row_bytes / 2**20,
                  baseline or None, baseline_decode or None)


def goal_for(stages: Stages, device: torch.device) -> tuple[str, float]:
    if device.type == "cuda":
        return GPU_GOAL
    return CPU_GOALS.get(stages.setup.split("@")[0], CPU_DEFAULT_GOAL)


def report(stages: Stages, device: torch.device) -> list[str]:
    of, goal = goal_for(stages, device)
    share = stages.share(of)
    lines = [f"\n{stages.setup}: {stages.videos} videos x {stages.frames} frames, batch "
             f"{stages.batch}, {stages.workers} decode workers, {stages.writers} writers, "
             f"codec {stages.codec}, {stages.row_mb_on_disk:.3f} MB per row on disk",
             f"  {'stage':<10}{'frames/s':>10}{'MB/s':>10}   (medians of {len(stages.pipeline)} "
             "rounds; shares: medians of per-round ratios)"]
    for stage in stages.rates:
        rate = stages.rate(stage)
        lines.append(f"  {stage:<10}{rate:>10.1f}{rate * stages.mb_per_frame[stage]:>10.1f}"
                     + ("   <- bounds" if stage == stages.slowest else ""))
    lines += [f"  {'serial':<10}{stages.bound('serial'):>10.1f}{'':>10}   1 / sum(1 / rate)",
              f"  {'pipeline':<10}{np.median(stages.pipeline):>10.1f}",
              f"  share of slowest {stages.share('slowest'):.3f}, of serial bound "
              f"{stages.share('serial'):.3f}, of backbone {stages.share('backbone'):.3f}",
              f"  goal: >= {goal} of the {of if of != 'serial' else 'serial bound'}: "
              f"{share:.3f} {'met' if share >= goal else 'NOT met'}"]
    if stages.baseline:
        old = stages.baseline_share()
        lines.append(f"  before issue 26: {old['frames_per_s']:.1f} frames/s, share of serial "
                     f"bound {old['share_of_serial']:.3f}, of backbone "
                     f"{old['share_of_backbone']:.3f}; now / before {old['now_over_before']:.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help="Comma-separated backbone@image_size[:videos] (default videos: "
                             "--videos).")
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--video-frames", type=int, default=175,
                        help="Frames per generated video (175: UCF101's ~7 s at 25 fps).")
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the generated videos")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--resize", type=int, default=None,
                        help="Resize before the crop (default: the backbone's, 256 at 224).")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--writers", type=int, default=None)
    parser.add_argument("--codec", default=None, help="Row codec (default: extract's).")
    parser.add_argument("--store-dtype", default=None,
                        help="Stored dtype of the rows (default: extract's, float16).")
    parser.add_argument("--baseline", action="store_true",
                        help="Also measure the pipeline as it was before issue 26, same rounds.")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Rounds of every measurement (median of the per-round ratios).")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--small", action="store_true",
                        help="Tiny sizes (2 videos of 96x72, resnet18 @ 64, inline decoding): "
                             "the code paths in seconds, for the test suite.")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.small:
        args.setups, args.video_frames, args.size = "resnet18@64:2", 10, "96x72"
        args.resize = args.resize or 72
        args.workers = 0 if args.workers is None else args.workers
        args.rounds = 1
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    width, height = (int(v) for v in args.size.split("x"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{device} ({name}); {args.video_frames}-frame videos of {width}x{height}")
        setups = [parse_setup(s, args.videos) for s in args.setups.split(",")]
        lines = write_videos(tmp / "root", max(n for _, _, n in setups), args.video_frames,
                             width, height)
        for i, (backbone, size, videos) in enumerate(setups):
            work = tmp / f"work{i}"
            (work / "splits").mkdir(parents=True)
            (work / "splits" / "trainlist.txt").write_text("\n".join(lines[:videos]) + "\n")
            stages = measure(backbone, size, tmp / "root", work / "splits", work, args, device)
            print("\n".join(report(stages, device)), flush=True)
            of, goal = goal_for(stages, device)
            results.append({**stages.to_json(), "goal": {"of": of, "at_least": goal,
                                                         "share": round(stages.share(of), 3)}})
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "video_frames": args.video_frames,
                                               "size": args.size, "setups": results},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
