"""The built-in toy dataset of `make demo` (`python cli.py toy-data`): small H.264 videos in the
``custom`` dataset layout, generated deterministically.

An actor takes a sequence of poses: each pose is one of nine shared primitives (a shape in its
own colour: a red disc, an orange bar, a yellow square, ...), and a class is an ordered sequence
of three distinct poses (``disc-square-cross``). Classes differ only by which poses follow which
- never by anything else: size, position, background and the colours' exact shades are drawn per
video.
The pixel version of the ``synth`` cache: every class a sequence of shared patterns, and every
video carries the paper's three kinds of misalignment:

- duration: the poses take a random time window; before and after it the actor rests (a small
  grey dot, the same in every class), as an action sits somewhere inside an untrimmed video;
- evolution: progress inside the window is non-linear, ``p ** g`` with g random per video;
- spatial: the actor stands at a random image position.

Because every pose appears in many classes of every split, what a backbone learns about poses on
the train classes carries over to the novel val / test classes; what tells those classes apart
is which poses come when, which misaligned videos scramble frame by frame. Nine poses (504
classes) rather than six (120) make two classes of a split share fewer poses (2 or 3 of 3 poses
shared: 6 of the default test split's 45 class pairs, against 20 with six poses), so matching
the right frames pays off; with six poses TA2N led ProtoNet by 6-10 points on val episodes of
the demo, with nine by 20 (DemoConfig).

Layout written under ``--out``::

    videos/<class>/<class>_v<k>.mp4      the videos (the --root of `extract --dataset custom`)
    splits/{train,val,test}list.txt      '<class>/<stem>' lines, disjoint classes per split
    toydata.json                         the config and each video's ground truth

Everything is a function of the config (seed included), so the same config gives the same
videos; a rerun with the same config and all files present reuses them.
"""

from __future__ import annotations

import itertools
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
from cache.options import Range, option
from cache.paths import claim_folder

SPLITS = ("train", "val", "test")
# The shared poses: a shape and its hue (fraction of the colour circle).
POSES = (("disc", 0.0), ("bar", 0.07), ("square", 0.15), ("frame", 0.25), ("triangle", 0.33),
         ("cross", 0.5), ("ring", 0.62), ("diamond", 0.8), ("saltire", 0.92))
LENGTH = 3  # poses per class
TOYDATA_FILE = "toydata.json"
TOYDATA_VERSION = 4

MAX_SIZE = 1024  # frame side: a toy video stays a few MB in memory
MAX_FRAMES = 1000


def all_classes() -> list[tuple[int, ...]]:
    """Every class: an ordered sequence of LENGTH distinct poses (504 of them)."""
    return list(itertools.permutations(range(len(POSES)), LENGTH))


def class_name(sequence: tuple[int, ...]) -> str:
    return "-".join(POSES[i][0] for i in sequence)


@dataclass
class ToyConfig:
    """What `toy-data` generates.

    Args:
        train_classes, val_classes, test_classes: classes per split (disjoint sequences, all of
            the same nine poses).
        videos_per_class: videos of every class.
        frames: frames per video.
        size: side of the square frames, in pixels.
        fps: frame rate written in the files.
        min_duration, max_duration: shortest and longest action window, as fractions of the
            video (drawn uniformly in between).
        evolution: progress exponents g are drawn log-uniformly from [1/evolution, evolution].
        seed: every random choice (classes per split, placement, timing, colours) derives from it.
    """

    train_classes: int = option(16)
    val_classes: int = option(6)
    test_classes: int = option(10)
    videos_per_class: int = option(8)
    frames: int = option(24, help="Frames per video.")
    size: int = option(112, help="Frame side in pixels.")
    fps: int = 12
    min_duration: float = option(0.45, help="Shortest action window, as a fraction of the video "
                                 "(the actor rests before and after it).")
    max_duration: float = option(0.85, help="Longest action window, as a fraction of the video.")
    evolution: float = option(2.0, range=Range(1),
                              help="Progress exponents are log-uniform in [1/E, E].")
    seed: int = option(0)

    def check(self) -> None:
        counts = (self.train_classes, self.val_classes, self.test_classes)
        if min(counts) < 0 or sum(counts) < 1:
            raise UserError("toy-data needs a non-negative number of classes per split")
        if sum(counts) > len(all_classes()):
            raise UserError(f"toy-data has {len(all_classes())} classes at most (ordered "
                            f"sequences of {LENGTH} of {len(POSES)} poses); {sum(counts)} "
                            "were asked for")
        if self.size > MAX_SIZE or self.frames > MAX_FRAMES:  # before any frame is allocated
            raise UserError(f"toy-data takes --size up to {MAX_SIZE} and --frames up to "
                            f"{MAX_FRAMES} (a toy dataset; {self.size} px x {self.frames} frames "
                            "were asked for)")
        if self.videos_per_class < 1 or self.frames < 2 or self.size < 32 or self.size % 2:
            raise UserError("toy-data needs videos_per_class >= 1, frames >= 2 and an even "
                            "size >= 32 (4:2:0 video)")
        if not 0 < self.min_duration <= self.max_duration <= 1 or self.evolution < 1:
            raise UserError("toy-data needs 0 < min_duration <= max_duration <= 1 and "
                            "evolution >= 1")


# ------------------------------------------------------------------------------ what to draw
def split_classes(cfg: ToyConfig) -> dict[str, list[str]]:
    """Class names of each split, dealt from a seeded shuffle of every sequence; a class that
    brings a pose the split lacks goes first, so a split of a few classes shows all nine poses
    (every default split does): what is learnt about a pose on train classes is used on every
    split."""
    order = np.random.default_rng([cfg.seed, 0]).permutation(len(all_classes()))
    remaining = [all_classes()[i] for i in order]
    counts = {"train": cfg.train_classes, "val": cfg.val_classes, "test": cfg.test_classes}
    out = {}
    for split in SPLITS:
        chosen: list[tuple[int, ...]] = []
        while len(chosen) < counts[split]:
            missing = set(range(len(POSES))).difference(*chosen)
            pick = next((s for s in remaining if missing & set(s)), remaining[0])
            chosen.append(pick)
            remaining.remove(pick)
        out[split] = [class_name(s) for s in chosen]
    return out


def plan_video(cfg: ToyConfig, sequence: tuple[int, ...], rng: np.random.Generator) -> dict:
    """The random choices of one video: placement, timing, appearance (its ground truth)."""
    size = cfg.size
    radius = float(rng.uniform(0.15, 0.2)) * size
    # keep the actor inside the central 80% (a 112/128 centre crop keeps 87.5%)
    low, high = 0.1 * size + radius, 0.9 * size - radius
    duration = int(round(rng.uniform(cfg.min_duration, cfg.max_duration) * cfg.frames))
    duration = min(max(duration, 2), cfg.frames)
    begin = int(rng.integers(0, cfg.frames - duration + 1))
    exponent = float(math.exp(rng.uniform(-1, 1) * math.log(cfg.evolution)))
    return {
        "poses": [POSES[i][0] for i in sequence],
        "colours": [hsv_to_rgb((POSES[i][1] + rng.uniform(-0.03, 0.03)) % 1,
                               rng.uniform(0.6, 0.9), rng.uniform(0.85, 1.0)) for i in sequence],
        "centre": rng.uniform(low, high, size=2).round(2).tolist(),
        "radius": round(radius, 2),
        "window": [begin, begin + duration],
        "exponent": round(exponent, 4),
        "background": [int(v) for v in rng.integers(15, 70, size=3)],
        "gradient": round(float(rng.uniform(0, 2 * math.pi)), 4),
    }


def hsv_to_rgb(h: float, s: float, v: float) -> list[int]:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    rgb = v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)
    return [int(round(255 * c)) for c in rgb]


def progress_at(frame: int, window: list[int], exponent: float) -> float:
    """Fraction of the action done at ``frame`` inside the window: p ** g, p linear in time."""
    begin, end = window
    p = (frame - begin) / max(end - 1 - begin, 1)
    return float(np.clip(p, 0.0, 1.0) ** exponent)


def pose_at(frame: int, plan: dict) -> int | None:
    """Index (into the plan's poses) of the pose shown at ``frame``; None while resting."""
    begin, end = plan["window"]
    if not begin <= frame < end:
        return None
    length = len(plan["poses"])
    return min(int(progress_at(frame, plan["window"], plan["exponent"]) * length), length - 1)


# ------------------------------------------------------------------------------ drawing
def shape_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance in pixels (negative inside) of every pixel to the shape of radius r
    centred at the origin, (dx, dy) the pixel offsets (y downwards)."""
    if shape == "disc":
        return np.hypot(dx, dy) - r
    if shape == "ring":
        return np.abs(np.hypot(dx, dy) - 0.72 * r) - 0.28 * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.8 * r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - r) / math.sqrt(2)
    if shape == "bar":
        return np.maximum(np.abs(dx) - r, np.abs(dy) - 0.4 * r)
    if shape == "frame":
        return np.abs(np.maximum(np.abs(dx), np.abs(dy)) - 0.68 * r) - 0.2 * r
    if shape in ("cross", "saltire"):
        if shape == "saltire":  # the cross turned by 45 degrees
            dx, dy = (dx + dy) / math.sqrt(2), (dx - dy) / math.sqrt(2)
        arm = 0.32 * r
        return np.minimum(np.maximum(np.abs(dx) - r, np.abs(dy) - arm),
                          np.maximum(np.abs(dx) - arm, np.abs(dy) - r))
    if shape == "triangle":  # pointing up, centred on its centroid
        edges = [np.sin(a) * dx + np.cos(a) * dy for a in (0.0, 2 * math.pi / 3,
                                                           4 * math.pi / 3)]
        return np.max(edges, axis=0) - 0.5 * r
    raise ValueError(f"unknown shape {shape!r}")


REST_COLOUR = (150, 150, 150)
REST_RADIUS = 0.3  # of the actor's radius


def render_video(plan: dict, cfg: ToyConfig) -> np.ndarray:
    """(frames, size, size, 3) uint8 frames of one planned video."""
    size = cfg.size
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    angle = plan["gradient"]
    ramp = ((xx * math.cos(angle) + yy * math.sin(angle)) / size)[..., None]  # (S, S, 1)
    background = np.asarray(plan["background"], float) * (0.7 + 0.6 * (ramp - ramp.min()))
    dx, dy = xx - plan["centre"][0], yy - plan["centre"][1]
    radius = plan["radius"]
    shapes = [np.clip(0.5 - shape_distance(s, dx, dy, radius), 0, 1)[..., None]
              for s in plan["poses"]]  # (S, S, 1) coverage of each pose, antialiased
    rest = np.clip(0.5 - shape_distance("disc", dx, dy, REST_RADIUS * radius), 0, 1)[..., None]
    video = np.empty((cfg.frames, size, size, 3), np.uint8)
    for f in range(cfg.frames):
        k = pose_at(f, plan)
        cover = rest if k is None else shapes[k]
        colour = np.asarray(REST_COLOUR if k is None else plan["colours"][k], float)
        video[f] = np.clip(background * (1 - cover) + colour * cover, 0, 255).round()
    return video


def rgb_to_yuv420p(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3 H / 2, W) uint8 planar YUV 4:2:0 (BT.601, limited range), in
    exact integer arithmetic; chroma is the rounded mean of each 2 x 2 block's.

    Why not let FFmpeg convert: libswscale's RGB -> YUV result depends on the input buffer's
    memory alignment (SIMD paths round differently from the scalar edges; measured: the same
    frame at 64 byte offsets gave 10 different outputs), and numpy's frame buffers
    are 0 or 16 bytes past a 64-byte boundary depending on what was allocated before - so the
    same video was not always the same bytes."""
    r, g, b = (image[..., i].astype(np.int32) for i in range(3))
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128
    v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128
    height, width = y.shape

    def half(c: np.ndarray) -> np.ndarray:  # (H, W) -> (H/2, W/2) rounded block means
        return (c.reshape(height // 2, 2, width // 2, 2).sum((1, 3)) + 2) >> 2

    planes = [y.ravel(), half(u).ravel(), half(v).ravel()]
    return np.concatenate(planes).astype(np.uint8).reshape(height * 3 // 2, width)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int) -> None:
    """Encode (F, H, W, 3) uint8 frames (H, W even) as H.264 mp4, the same bytes every time:
    colour converted here (``rgb_to_yuv420p``), x264 single-threaded and without macroblock-tree
    rate control (with it, 17 of 100 encodes of one toy video in one process differed from
    the other 83; without it 100 of 100 were identical)."""
    import av

    with atomic_path(path, suffix=".mp4") as tmp, av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "12", "preset": "fast", "threads": "1",
                          "x264-params": "mbtree=0"}
        for image in frames:
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(image), format="yuv420p")
            for packet in stream.encode(frame):
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
    by_name = {class_name(s): s for s in all_classes()}
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


def _made_before_markers(out: Path) -> bool:
    """A folder toy-data wrote before it left a marker: its toydata.json is this tool's."""
    try:
        record = json.loads((out / TOYDATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"version", "config", "videos"} <= set(record)


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
    claim_folder(out, "toy-data", "--out", legacy=_made_before_markers)  # before the work
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
