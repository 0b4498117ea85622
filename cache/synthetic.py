"""The `synth` benchmark cache: classes are temporal ORDERS of a few shared patterns.

Every class is a sequence of the same few channel patterns: by default ``length`` = 4 patterns out
of ``patterns`` = 4, without immediate repeats (e.g. 0-2-1-2); with ``length`` = 0 every class is
a permutation of all the patterns, so a video's bag of patterns says nothing about its class and
only the order does. (In that strict mode free temporal attention such as TA2N's TC cannot help
by design - it matches content regardless of order - while order-preserving alignment (TTM, OTAM)
can.) Each video plays its class's sequence

- inside a random time window of the T frames (duration misalignment: TTM's job),
- with non-linear progress ``p ** g`` inside the window, g random per video (evolution
  misalignment: TC's job),
- as a Gaussian blob at a random position of the H x W map (spatial misalignment: SC's job),

over a static per-video background (clutter at every position) plus per-frame noise. With no
dataset at hand this shows that alignment matters: frame-wise ProtoNet suffers from all three.

The generator's config and the ground truth of every row are stored in ``attrs["synthetic"]``:
``windows`` ([start, stop) frame indices of the action, one per row), ``positions`` ([x, y] blob
centre in map cells, x along W), ``exponents`` (the progress exponent g) and ``sequences`` (the
pattern order of each class).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from cache.errors import UserError
from cache.latest import remember_cache
from cache.paths import writer_lock
from cache.store import FeatureCache, check_output


@dataclass
class SynthConfig:
    """What `synth` generates.

    Args:
        channels, frames, size: C, T and H = W of every feature map.
        patterns: shared channel patterns every class is made of.
        length: 0 (default): every class is a permutation of all the patterns, so classes differ
            only in their order (patterns! classes at most); L > 0: every class is a sequence of
            L patterns without immediate repeats (classes also differ in which patterns they
            show and how often).
        train_classes, val_classes, test_classes: classes per split (disjoint, as in few-shot).
        videos_per_class: rows per class.
        min_duration: shortest action window, as a fraction of T.
        evolution: progress exponents g are drawn log-uniformly from [1/evolution, evolution].
        blob_sigma: spatial extent of the action blob, in map cells.
        background: amplitude of the static per-video clutter at every position.
        noise: amplitude of the per-frame noise.
        aug_views: extra training views per row (jittered window and position, fresh noise).
        seed: everything is drawn from this seed.
        dtype: stored dtype, "float16" or "float32".
    """

    channels: int = 64
    frames: int = 8
    size: int = 7
    patterns: int = 4
    length: int = 4
    train_classes: int = 64
    val_classes: int = 16
    test_classes: int = 24
    videos_per_class: int = 20
    min_duration: float = 0.5
    evolution: float = 2.0
    blob_sigma: float = 1.0
    background: float = 0.3
    noise: float = 0.3
    aug_views: int = 0
    seed: int = 0
    dtype: str = "float16"

    def check(self) -> None:
        if self.frames < 4 or self.size < 4 or self.channels < 1:
            raise UserError(f"synth needs frames >= 4, size >= 4, channels >= 1 "
                            f"(got T={self.frames}, size={self.size}, C={self.channels})")
        counts = {"--train-classes": self.train_classes, "--val-classes": self.val_classes,
                  "--test-classes": self.test_classes, "--length": self.length,
                  "--aug-views": self.aug_views}
        for option, value in counts.items():
            if value < 0:
                raise UserError(f"{option} must be 0 or more, not {value}")
        if self.videos_per_class < 1 or self.patterns < 1:
            raise UserError("--videos-per-class and --patterns must be at least 1")
        if min(self.background, self.noise) < 0 or self.blob_sigma <= 0:
            raise UserError("--background and --noise must be >= 0, blob_sigma > 0")
        total = self.train_classes + self.val_classes + self.test_classes
        if total < 1:
            raise UserError("synth needs at least one class")
        if total > len(class_sequences(self)):
            raise UserError(f"{total} classes need more distinct pattern orders than "
                            f"{self.patterns} patterns give: raise --patterns (or --length)")
        if not 0 < self.min_duration <= 1:
            raise UserError("--min-duration is a fraction of the frames in (0, 1]")
        if self.evolution < 1:
            raise UserError("--evolution must be >= 1 (1 = linear progress)")


def class_sequences(cfg: SynthConfig) -> list[tuple[int, ...]]:
    """Every possible class: the pattern order it shows."""
    if cfg.length <= 0:
        return list(itertools.permutations(range(cfg.patterns)))
    return [seq for seq in itertools.product(range(cfg.patterns), repeat=cfg.length)
            if all(a != b for a, b in zip(seq, seq[1:]))]


def _blob(size: int, x: float, y: float, sigma: float) -> np.ndarray:
    """(size, size) Gaussian blob centred at (x, y), peak 1."""
    grid = np.arange(size, dtype=np.float32)
    wy = np.exp(-((grid - y) ** 2) / (2 * sigma**2))
    wx = np.exp(-((grid - x) ** 2) / (2 * sigma**2))
    return wy[:, None] * wx[None, :]


def _segments(start: int, stop: int, exponent: float, frames: int, segments: int) -> np.ndarray:
    """(T,) sequence position shown at each frame, -1 outside the action window."""
    seg = np.full(frames, -1, dtype=np.int64)
    t = np.arange(start, stop)
    progress = ((t - start + 0.5) / (stop - start)) ** exponent  # non-linear evolution
    seg[start:stop] = np.minimum(segments - 1, np.floor(progress * segments)).astype(np.int64)
    return seg


class _Video:
    """Draws one row's ground truth and renders its maps."""

    def __init__(self, cfg: SynthConfig, rng: np.random.Generator):
        t, s = cfg.frames, cfg.size
        length = int(rng.integers(math.ceil(cfg.min_duration * t), t + 1))
        self.start = int(rng.integers(0, t - length + 1))
        self.stop = self.start + length
        self.exponent = float(np.exp(rng.uniform(-np.log(cfg.evolution), np.log(cfg.evolution))))
        self.x, self.y = (float(v) for v in rng.uniform(0, s - 1, size=2))
        self.clutter = cfg.background * rng.standard_normal((cfg.channels, s, s), dtype=np.float32)

    def render(self, cfg: SynthConfig, patterns: np.ndarray, sequence: tuple[int, ...],
               rng: np.random.Generator, jitter: bool = False) -> np.ndarray:
        t, s = cfg.frames, cfg.size
        start, stop, x, y = self.start, self.stop, self.x, self.y
        if jitter:  # an augmented view: the window and the blob move a little
            shift = int(rng.integers(-1, 2))
            start, stop = max(0, start + shift), min(t, stop + shift)
            if stop - start < 1:
                start, stop = self.start, self.stop
            x = float(np.clip(x + rng.uniform(-1, 1), 0, s - 1))
            y = float(np.clip(y + rng.uniform(-1, 1), 0, s - 1))
        blob = _blob(s, x, y, cfg.blob_sigma)  # (H, W)
        seg = _segments(start, stop, self.exponent, t, len(sequence))  # (T,)
        maps = np.broadcast_to(self.clutter[:, None], (cfg.channels, t, s, s)).copy()  # (C,T,H,W)
        maps += cfg.noise * rng.standard_normal(maps.shape, dtype=np.float32)
        for frame in np.flatnonzero(seg >= 0):
            maps[:, frame] += patterns[sequence[seg[frame]]][:, None, None] * blob  # (C, H, W)
        return maps


def _write_rows(cache: FeatureCache, cfg: SynthConfig, videos: list[_Video], sequences: list,
                labels: np.ndarray, patterns: np.ndarray, rng: np.random.Generator,
                progress: bool) -> None:
    for row in tqdm(range(len(labels)), desc="synth", unit="video", disable=not progress):
        video, seq = videos[row], sequences[labels[row]]
        aug = None
        if cfg.aug_views:
            aug = np.stack([video.render(cfg, patterns, seq, rng, jitter=True)
                            for _ in range(cfg.aug_views)])
        cache.write_row(row, video.render(cfg, patterns, seq, rng), aug=aug)


def generate_synthetic(out: str, cfg: SynthConfig, *, backend: str | None = None,
                       overwrite: bool = False, progress: bool = True) -> dict:
    """Write the synthetic cache to ``out``; returns a summary for the CLI."""
    cfg.check()
    check_output(out, backend)
    rng = np.random.default_rng(cfg.seed)
    patterns = rng.standard_normal((cfg.patterns, cfg.channels), dtype=np.float32)
    orders = class_sequences(cfg)
    chosen = rng.permutation(len(orders))
    counts = {"train": cfg.train_classes, "val": cfg.val_classes, "test": cfg.test_classes}
    sequences, class_split = [], []
    for split, n in counts.items():
        for _ in range(n):
            sequences.append(orders[chosen[len(sequences)]])
            class_split.append(split)
    classes = ["seq-" + "".join(str(p) for p in seq) for seq in sequences]
    labels = np.repeat(np.arange(len(classes)), cfg.videos_per_class)
    splits = [class_split[c] for c in labels]
    video_ids = [f"{classes[c]}/v{i % cfg.videos_per_class:04d}" for i, c in enumerate(labels)]

    videos = [_Video(cfg, rng) for _ in labels]
    truth = {
        "config": asdict(cfg),
        "sequences": {name: list(seq) for name, seq in zip(classes, sequences)},
        "windows": [[v.start, v.stop] for v in videos],
        "positions": [[round(v.x, 4), round(v.y, 4)] for v in videos],
        "exponents": [round(v.exponent, 4) for v in videos],
    }
    attrs = {"dataset": "synthetic", "backbone": "synthetic", "weights": "none",
             "sampling": f"{cfg.frames} frames, synthetic", "synthetic": truth}
    with writer_lock(out, what="synth"):
        cache = FeatureCache.create(out, video_ids=video_ids, splits=splits, labels=labels,
                                    classes=classes,
                                    shape=(cfg.channels, cfg.frames, cfg.size, cfg.size),
                                    dtype=cfg.dtype, aug_views=cfg.aug_views, attrs=attrs,
                                    backend=backend, overwrite=overwrite)
        with cache:
            _write_rows(cache, cfg, videos, sequences, labels, patterns, rng, progress)
            summary = {"path": cache.path, "rows": len(labels), "classes": len(classes),
                       "per_split": counts, "shape": list(cache.shape), "backend": cache.backend}
    remember_cache(out, "synthetic")
    return summary
