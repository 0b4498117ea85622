"""The configs of `analyze embedding`, `analyze misalignment` and `visualize`, apart from the
modules that run them (matplotlib, sklearn) so that the CLI can generate their options without
importing those."""

from __future__ import annotations

import math
from dataclasses import dataclass

from align.options import DEFAULT_SHOT, DEFAULT_WAY
from cache import UserError
from cache.options import Range, option


@dataclass
class EmbeddingConfig:
    """Which episodes `analyze embedding` draws and how it embeds them.

    Each field's meaning and default is its ``option(...)`` declaration, the text
    ``python cli.py analyze embedding --help`` shows (cache/options.py). way, shot: N-way K-shot
    (the command's --way / --shots default to the run's, else these). Every episode adds
    way*queries circles and way triangles; the seed draws the evaluation stream (the same
    episodes as the first ones of `evaluate --seed`); the perplexity is capped for small point
    sets.
    """

    way: int = DEFAULT_WAY
    shot: int = DEFAULT_SHOT
    split: str = option("test", choices=("train", "val", "test"))
    episodes: int = option(10, range=Range(1))
    queries: int = option(5, range=Range(1), help="Queries per class.")
    seed: int = option(0, help="Seed of the episodes and t-SNE.")
    perplexity: float = option(30.0, range=Range(0, low_open=True), help="t-SNE perplexity.")

    def check(self) -> EmbeddingConfig:
        """Refuse numbers that cannot mean anything (one line each); returns self."""
        for name, least in (("way", 2), ("shot", 1), ("queries", 1), ("episodes", 1)):
            if getattr(self, name) < least:
                option = "shots" if name == "shot" else name
                raise UserError(f"--{option} must be at least {least}, not {getattr(self, name)}")
        if not (math.isfinite(self.perplexity) and self.perplexity > 0):
            raise UserError(f"--perplexity must be a positive number, not {self.perplexity}")
        return self


@dataclass
class MisalignmentConfig:
    """How `analyze misalignment` measures start times and AEM.

    The options' meaning and default are their ``option(...)`` declarations, the text
    ``python cli.py analyze misalignment --help`` shows (cache/options.py). Readout "frame" is
    one linear map shared by all frames (the paper's per-frame reading; right when single frames
    identify the class); "online" is a linear map per frame index whose evidence adds up over
    time, so the order of what was shown counts (needed when classes differ only in temporal
    order, as in the synthetic cache). Each video is scored by a classifier of a fold that never
    saw it; the regression runs on standardised features.

    Args:
        max_iter: L-BFGS iterations per fold.
        threshold: a frame "shows" the action when its true-class probability reaches this.
    """

    split: str = option("all", choices=("all", "train", "val", "test"),
                        help="Videos to analyse.")
    readout: str = option("frame", choices=("frame", "online"),
                          help="p_t from frame t alone, or from frames 0..t (order-defined "
                               "classes).")
    folds: int = option(5, help="k-fold split by video.")
    seed: int = option(0, help="Seed of the folds.")
    weight_decay: float = option(1e-2, help="L2 of the classifier.")
    max_iter: int = 100
    threshold: float = 0.5


@dataclass
class VisualizeConfig:
    """What `visualize` draws.

    Each declared field's meaning and default is its ``option(...)`` declaration, the text
    ``python cli.py visualize --help`` shows (cache/options.py): the episodes are the first ones
    `evaluate` would score with the same seed, split, way and queries (or those of a saved
    episode file); pairs "all" draws every prototype with every query, "true" each query with
    its own class, "true+predicted" also with the class it was taken for, when wrong.

    Args:
        allow_other_features: draw a head on a cache of other features than it was trained on
            (refused without it; see cache/features.py).
    """

    checkpoint: str | None = option(None, help="A head trained by train-heads [default: the "
                                    "latest run's best.pt].")
    cache: str | None = option(None, help="[default: the checkpoint's run's cache]")
    episodes: int = option(1, help="Episodes to draw.")
    episodes_from: str | None = option(None, metavar="FILE", help="Draw the first episodes of a "
                                       "saved episode list (evaluate --save-episodes).")
    split: str = option("test", choices=("train", "val", "test"))
    way: int | None = option(None, range=Range(2), kind=int,
                             help="[default: the run's way, else 5]")
    queries: int = option(1, help="Queries per class.")
    seed: int = option(0, help="Same seed as evaluate: the same first episodes.")
    pairs: str = option("all", choices=("all", "true", "true+predicted"),
                        help="Every prototype with every query, each query with its own class, "
                             "or also with the class it was wrongly taken for.")
    root: str | None = option(None, help="Dataset folder, if it moved since extraction.")
    out: str | None = option(None, help="Figure folder [default: <run dir>/figures].")
    allow_other_features: bool = False  # a hand-written option: its help is shared (cli.py)
