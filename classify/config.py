"""The config of `classify`, apart from classify/command.py (which loads matplotlib through
classify/report.py) so that the CLI can generate its options without importing that."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from align.models import head_names
from cache.options import Range, option


@dataclass
class ClassifyConfig:
    """One classify run (the CLI's options).

    Each declared field's meaning and default is its ``option(...)`` declaration, the text
    ``python cli.py classify --help`` shows (cache/options.py).

    Args:
        support: folder with one sub-folder of clips per class.
        query: clip files and/or folders (searched recursively).
        backbone: a training-free head's backbone without a cache.
        show: rows of the console table.
    """

    support: str
    query: tuple[str, ...]
    checkpoint: str | None = option(None, help="A head from train-heads [default: the latest "
                                    "run's best.pt].")
    head: str | None = option(None, choices=partial(head_names, training_free=True),
                              help="A training-free head instead of a checkpoint (with --cache "
                                   "or --backbone).")
    cache: str | None = option(None, help="The cache whose backbone, weights, preprocessing and "
                               "T are used  [default: the one the checkpoint was trained on].")
    backbone: str | None = None  # a hand-written option: its name is checked by a callback
    weights: str = option("pretrained", help="With --backbone: pretrained, none, or a weights "
                          "file (as extract).")
    frames: int = option(8, range=Range(1), aliases=("-T",),
                         help="With --backbone: frames per clip.")
    image_size: int | None = option(None, range=Range(1), kind=int,
                                    help="With --backbone: crop side  [default: the backbone's "
                                         "input size].")
    out: str = option("predictions.csv", help="Predictions CSV.")
    json: str | None = option(None, metavar="FILE", help="Also write the predictions, accuracy "
                              "and support set as JSON.")
    features: str | None = option(None, metavar="DIR",
                                  help="Keep the clips' maps in this folder: a rerun with more "
                                       "queries or another checkpoint of the same cache "
                                       "recomputes nothing.")
    figures: str | None = option(None, metavar="DIR", help="Draw each query's alignment figure "
                                 "with its predicted class's support clip.")
    max_figures: int | None = option(None, range=Range(1), kind=int,
                                     help="Only the first N queries' figures  [default: every "
                                          "query's].")
    workers: int = option(0, range=Range(0), help="Decode processes (0: decode in this process).")
    overwrite: bool = option(False, help="Replace an existing --out / --json file.")
    show: int = 10
