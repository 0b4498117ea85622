"""The built-in demo dataset (`python cli.py toy-data`): short videos of a shape drawing a
two-stroke path, written as real mp4 files in the ``custom`` dataset layout,
generated deterministically.

A class is an ordered pair of stroke directions (``right-then-up``): a bright shape moves along the
first stroke, turns, and moves along the second, leaving a trail. Classes differ only by how the
motion evolves - the order of the strokes (``right-then-up`` against ``up-then-right``) and their
directions - never by appearance: shape, colours and background are drawn per video. Every video
carries the paper's three kinds of misalignment, in pixels:

- duration: the motion happens inside a random time window of the video (still before and after);
- evolution: progress inside the window is non-linear, ``p ** g`` with g random per video;
- spatial: the path starts at a random image position.

Layout written under ``--out``::

    videos/<class>/<class>_v<k>.mp4      the videos (the --root of `extract --dataset custom`)
    splits/{train,val,test}list.txt      '<class>/<stem>' lines, disjoint classes per split
    toydata.json                         the config and each video's ground truth

Everything is a function of the config (seed included), so the same config gives the same
videos; a rerun with the same config and all files present reuses them.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cache import UserError
from cache.atomic import atomic_path

SPLITS = ("train", "val", "test")
# Stroke directions in image coordinates (y grows downwards), counter-clockwise from "right".
DIRECTIONS = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")
TURNS = (2, 3)  # eighths of a turn between the strokes: 90 and 135 degrees, both ways
TOYDATA_FILE = "toydata.json"
TOYDATA_VERSION = 1


def direction_vector(index: int) -> np.ndarray:
    """Unit vector (dx, dy) of DIRECTIONS[index] in image coordinates."""
    angle = index * math.pi / 4
    return np.array([math.cos(angle), -math.sin(angle)])


def all_classes() -> list[tuple[int, int]]:
    """Every class as (first, second) direction index, each next to its reversed order."""
    pairs = []
    for turn in TURNS:
        for first in range(len(DIRECTIONS)):
            second = (first + turn) % len(DIRECTIONS)
            pairs += [(first, second), (second, first)]
    return pairs


def class_name(pair: tuple[int, int]) -> str:
    return f"{DIRECTIONS[pair[0]]}-then-{DIRECTIONS[pair[1]]}"


@dataclass
class ToyConfig:
    """What `toy-data` generates.

    Args:
        train_classes, val_classes, test_classes: classes per split (disjoint; a split takes whole
            reversed-order pairs of the 32 classes, so an odd count leaves one unused).
        videos_per_class: videos of every class.
        frames: frames per video.
        size: side of the square frames, in pixels.
        fps: frame rate written in the files.
        min_duration: shortest motion window, as a fraction of the video.
        evolution: progress exponents g are drawn log-uniformly from [1/evolution, evolution].
        stroke: length of each stroke, as a fraction of ``size``.
        seed: every random choice (class order, placement, timing, colours) derives from it.
    """

    train_classes: int = 8
    val_classes: int = 5
    test_classes: int = 5
    videos_per_class: int = 5
    frames: int = 32
    size: int = 128
    fps: int = 16
    min_duration: float = 0.4
    evolution: float = 2.0
    stroke: float = 0.25
    seed: int = 0

    def check(self) -> None:
        counts = (self.train_classes, self.val_classes, self.test_classes)
        if min(counts) < 0 or sum(counts) < 1:
            raise UserError("toy-data needs a non-negative number of classes per split")
        groups = sum((n + 1) // 2 for n in counts)  # splits are dealt whole (AB, BA) groups
        if groups > len(all_classes()) // 2:
            raise UserError(f"toy-data has {len(all_classes())} classes at most (in pairs of "
                            f"reversed order, {len(all_classes()) // 2} pairs); "
                            f"{sum(counts)} classes were asked for")
        if self.videos_per_class < 1 or self.frames < 2 or self.size < 32:
            raise UserError("toy-data needs videos_per_class >= 1, frames >= 2 and size >= 32")
        if not 0 < self.min_duration <= 1 or self.evolution < 1 or not 0 < self.stroke <= 0.3:
            raise UserError("toy-data needs 0 < min_duration <= 1, evolution >= 1 and "
                            "0 < stroke <= 0.3")


# ------------------------------------------------------------------------------ what to draw
def split_classes(cfg: ToyConfig) -> dict[str, list[str]]:
    """Class names of each split, dealt in whole (AB, BA) groups from a seeded shuffle, so that
    every split with two classes or more holds classes that differ only by the order of their
    strokes (a split with an odd count leaves the other half of its last group unused)."""
    pairs = all_classes()
    groups = [pairs[i:i + 2] for i in range(0, len(pairs), 2)]
    order = iter(np.random.default_rng([cfg.seed, 0]).permutation(len(groups)))
    counts = {"train": cfg.train_classes, "val": cfg.val_classes, "test": cfg.test_classes}
    out = {}
    for split in SPLITS:
        taken = [groups[next(order)] for _ in range((counts[split] + 1) // 2)]
        out[split] = [class_name(p) for group in taken for p in group][:counts[split]]
    return out


def plan_video(cfg: ToyConfig, pair: tuple[int, int], rng: np.random.Generator) -> dict:
    """The random choices of one video: placement, timing, appearance (its ground truth)."""
    size, length = cfg.size, cfg.stroke * cfg.size
    first, second = direction_vector(pair[0]), direction_vector(pair[1])
    corners = np.array([[0.0, 0.0], first, first + second]) * length  # path relative to its start
    # keep the whole path inside the central 80% (a 224/256 centre crop keeps 87.5%)
    margin = 0.1 * size + 8 * size / 128
    low, high = margin, size - margin
    span_min, span_max = corners.min(axis=0), corners.max(axis=0)
    start = rng.uniform(low - span_min, high - span_max)  # (x, y) of the path's start
    duration = int(round(rng.uniform(cfg.min_duration, 1.0) * cfg.frames))
    duration = min(max(duration, 2), cfg.frames)
    begin = int(rng.integers(0, cfg.frames - duration + 1))
    exponent = float(math.exp(rng.uniform(-1, 1) * math.log(cfg.evolution)))
    hue = rng.uniform(0, 1)
    return {
        "path": (corners + start).round(2).tolist(),
        "window": [begin, begin + duration],
        "exponent": round(exponent, 4),
        "shape": "disc" if rng.random() < 0.5 else "square",
        "radius": round(float(rng.uniform(5, 8)) * size / 128, 2),
        "actor": hsv_to_rgb(hue, 0.6, 1.0),
        "trail": hsv_to_rgb((hue + rng.uniform(0.3, 0.7)) % 1, 0.7, 0.75),
        "background": [int(v) for v in rng.integers(15, 70, size=3)],
        "gradient": round(float(rng.uniform(0, 2 * math.pi)), 4),
    }


def hsv_to_rgb(h: float, s: float, v: float) -> list[int]:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    rgb = v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)
    return [int(round(255 * c)) for c in rgb]


def progress_at(frame: int, window: list[int], exponent: float) -> float:
    """Fraction of the path done at ``frame``: 0 before the window, 1 after, p ** g inside."""
    begin, end = window
    p = (frame - begin) / max(end - 1 - begin, 1)
    return float(np.clip(p, 0.0, 1.0) ** exponent)


def point_on_path(path: np.ndarray, fraction: float) -> tuple[np.ndarray, int]:
    """The point ``fraction`` of the way along the polyline, and the index of its segment."""
    lengths = np.linalg.norm(np.diff(path, axis=0), axis=1)
    target = fraction * lengths.sum()
    for i, seg in enumerate(lengths):
        if target <= seg or i == len(lengths) - 1:
            t = min(target / seg, 1.0) if seg > 0 else 0.0
            return path[i] + t * (path[i + 1] - path[i]), i
        target -= seg
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------ drawing
def _segment_distance(xy: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of every pixel centre (S, S, 2) to the segment a-b."""
    ab = b - a
    denom = float(ab @ ab)
    # an elementwise dot, not BLAS: its threading may change the last bit, and so a rounded pixel
    t = np.zeros(xy.shape[:2]) if denom == 0 else np.clip(((xy - a) * ab).sum(-1) / denom, 0, 1)
    return np.linalg.norm(xy - (a + t[..., None] * ab), axis=-1)


def render_video(plan: dict, cfg: ToyConfig) -> np.ndarray:
    """(frames, size, size, 3) uint8 frames of one planned video."""
    size = cfg.size
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    xy = np.stack([xx, yy], axis=-1)  # (S, S, 2) pixel centres, x first
    angle = plan["gradient"]
    ramp = ((xx * math.cos(angle) + yy * math.sin(angle)) / size)[..., None]  # (S, S, 1)
    background = np.asarray(plan["background"], float) * (0.7 + 0.6 * (ramp - ramp.min()))
    path = np.asarray(plan["path"])
    actor, trail = np.asarray(plan["actor"], float), np.asarray(plan["trail"], float)
    radius, width = plan["radius"], 1.6 * size / 128
    video = np.empty((cfg.frames, size, size, 3), np.uint8)
    for f in range(cfg.frames):
        where, segment = point_on_path(path, progress_at(f, plan["window"], plan["exponent"]))
        # the trail: the path drawn so far, with a soft edge
        done = [*path[:segment + 1], where]
        dist = np.full((size, size), np.inf)
        for a, b in zip(done[:-1], done[1:]):
            dist = np.minimum(dist, _segment_distance(xy, a, b))
        alpha = np.clip(width + 0.5 - dist, 0, 1)[..., None]
        frame = background * (1 - alpha) + trail * alpha
        # the actor on top
        offset = np.abs(xy - where)
        edge = (np.linalg.norm(offset, axis=-1) if plan["shape"] == "disc"
                else offset.max(axis=-1))
        alpha = np.clip(radius + 0.5 - edge, 0, 1)[..., None]
        video[f] = np.clip(frame * (1 - alpha) + actor * alpha, 0, 255).round()
    return video


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int) -> None:
    """Encode (F, H, W, 3) uint8 frames as H.264 mp4 (single-threaded: same bytes every time)."""
    import av

    with atomic_path(path, suffix=".mp4") as tmp, av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "12", "preset": "fast", "threads": "1"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ------------------------------------------------------------------------------ the dataset
@dataclass
class ToyDataset:
    """Where a toy dataset lives: pass ``root`` and ``split_dir`` to `extract --dataset custom`."""

    out: str
    root: str
    split_dir: str
    classes: dict[str, list[str]]
    videos: int
    reused: bool
    seconds: float


def _plans(cfg: ToyConfig) -> dict[str, list[tuple[str, str, dict]]]:
    """(class, stem, plan) of every video, per split."""
    by_name = {class_name(p): p for p in all_classes()}
    label_seed = {name: i for i, name in enumerate(by_name)}
    plans: dict[str, list[tuple[str, str, dict]]] = {}
    for split, names in split_classes(cfg).items():
        plans[split] = []
        for name in names:
            for k in range(cfg.videos_per_class):
                rng = np.random.default_rng([cfg.seed, 1, label_seed[name], k])
                plans[split].append((name, f"{name}_v{k:02d}", plan_video(cfg, by_name[name], rng)))
    return plans


def _complete(out: Path, cfg: ToyConfig) -> bool:
    """True when ``out`` already holds this very config's dataset, every file present."""
    record = out / TOYDATA_FILE
    if not record.exists():
        return False
    try:
        saved = json.loads(record.read_text())
    except json.JSONDecodeError:
        return False
    if saved.get("version") != TOYDATA_VERSION or saved.get("config") != asdict(cfg):
        return False
    return all((out / "videos" / f"{v}.mp4").exists() for v in saved["videos"])


def make_toy_dataset(out: str | os.PathLike, cfg: ToyConfig | None = None, *,
                     progress: bool = True) -> ToyDataset:
    """Write the toy dataset under ``out`` (videos/, splits/, toydata.json) and say where it is."""
    cfg = cfg or ToyConfig()
    cfg.check()
    start = time.perf_counter()
    out = Path(out)
    root, split_dir = out / "videos", out / "splits"
    plans = _plans(cfg)
    classes = {split: list(dict.fromkeys(c for c, _, _ in rows)) for split, rows in plans.items()}
    n_videos = sum(len(rows) for rows in plans.values())
    reused = _complete(out, cfg)
    if not reused:
        (out / TOYDATA_FILE).unlink(missing_ok=True)  # a half-written dataset is never "complete"
        with tqdm(total=n_videos, desc="toy-data", unit="video", disable=not progress) as bar:
            for rows in plans.values():
                for name, stem, plan in rows:
                    (root / name).mkdir(parents=True, exist_ok=True)
                    write_video(root / name / f"{stem}.mp4", render_video(plan, cfg), cfg.fps)
                    bar.update()
        split_dir.mkdir(parents=True, exist_ok=True)
        for split, rows in plans.items():
            lines = "".join(f"{name}/{stem}\n" for name, stem, _ in rows)
            (split_dir / f"{split}list.txt").write_text(lines)
        record = {"version": TOYDATA_VERSION, "config": asdict(cfg), "classes": classes,
                  "videos": {f"{name}/{stem}": {"split": split, **plan}
                             for split, rows in plans.items() for name, stem, plan in rows}}
        (out / TOYDATA_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return ToyDataset(out=str(out), root=str(root), split_dir=str(split_dir), classes=classes,
                      videos=n_videos, reused=reused, seconds=time.perf_counter() - start)


def format_toy_dataset(data: ToyDataset) -> str:
    """What `toy-data` prints."""
    counts = ", ".join(f"{len(data.classes[s])} {s}" for s in SPLITS)
    verb = "found (same config, reused)" if data.reused else f"written in {data.seconds:.1f} s"
    return "\n".join([
        f"toy data   {data.videos} videos of {sum(map(len, data.classes.values()))} classes "
        f"({counts}) {verb}",
        f"videos     {data.root}",
        f"splits     {data.split_dir}",
        f"extract    python cli.py extract --dataset custom --root {data.root} "
        f"--split-dir {data.split_dir}",
    ])
