"""The datasets this tool knows, one record each: split lists, video layout, video family, the
paper's train-heads recipe and the adaptation recipe.

Pure data, no I/O: both phases read it (extract: where the videos are and how to adapt on them;
align: the ``--recipe paper`` values of a cache's ``dataset`` attribute), so it sits in the
contract layer. Adding a dataset is one ``Dataset(...)`` line in ``DATASETS`` plus its split lists
under ``extract/splits/<split_folder>/`` (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperRecipe:
    """The authors' supplementary train-heads recipe (``--recipe paper``): SGD, the lr times
    ``lr_gamma`` every ``lr_step`` epochs, no early stopping. The fields are TrainConfig's."""

    epochs: int
    lr_step: int
    lr_gamma: float
    momentum: float
    val_every: int
    tasks_per_batch: int = 16
    optimizer: str = "sgd"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "step"
    warmup: int = 0
    dropout: float = 0.5
    patience: int = 0


@dataclass(frozen=True)
class AdaptationRecipe:
    """adapt-backbone's default recipe (this tool's, not the paper's: TA2N fine-tunes
    episodically); the fields are AdaptConfig's (warmup in epochs, batch_size in videos)."""

    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    epochs: int
    batch_size: int
    warmup: float = 1.0


@dataclass(frozen=True)
class Dataset:
    """One dataset: everything that is keyed by its name.

    Args:
        name: ``--dataset`` of extract and adapt-backbone; the cache's ``dataset`` attribute.
        paper: the paper's train-heads recipe for caches of this dataset (None: the paper has
            none, e.g. for a custom set; train-heads then takes ``DEFAULT_PAPER_RECIPE``'s and
            says so).
        adaptation: adapt-backbone's default recipe (None only for a dataset without videos).
        split_folder: the vendored lists under ``extract/splits/`` (None: the user's, from
            ``--split-dir``; two roots then hold two different datasets).
        flat: videos may also sit directly under the root by id (SSv2's ``<root>/<id>.webm``).
        class_spellings: class folders may spell spaces as underscores and back (Kinetics).
        flip: horizontal flips keep the class (False for SSv2: "left to right" is a class).
        family: the dataset whose videos these are, when another record's split lists name the
            same videos (ssv2-cmn -> ssv2): adapting on one counts as seeing the other's videos.
        videos: False for a dataset of features only (the ``synth`` command's synthetic cache):
            it has a train-heads recipe and is no choice of extract or adapt-backbone.
    """

    name: str
    paper: PaperRecipe | None = None
    adaptation: AdaptationRecipe | None = None
    split_folder: str | None = None
    flat: bool = False
    class_spellings: bool = False
    flip: bool = True
    family: str | None = None
    videos: bool = True

    def __post_init__(self):
        if self.videos and self.adaptation is None:
            raise ValueError(f"dataset {self.name!r} has videos, so it needs an adaptation "
                             "recipe")


# SGD as TSN / TSM fine-tune ImageNet ResNets; AdamW for small custom sets, often from scratch.
_SGD = dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, batch_size=64)
_UCF_PAPER = PaperRecipe(epochs=200, lr_step=5, lr_gamma=0.5, momentum=0.9, val_every=5)
_SSV2_PAPER = PaperRecipe(epochs=600, lr_step=30, lr_gamma=0.8, momentum=0.9, val_every=10)

DATASETS: dict[str, Dataset] = {record.name: record for record in (
    Dataset("ucf101", _UCF_PAPER, AdaptationRecipe(**_SGD, epochs=25), split_folder="ucf_ARN"),
    Dataset("hmdb51", _UCF_PAPER, AdaptationRecipe(**_SGD, epochs=25), split_folder="hmdb_ARN"),
    Dataset("ssv2", _SSV2_PAPER, AdaptationRecipe(**_SGD, epochs=15), split_folder="ssv2_OTAM",
            flat=True, flip=False),
    Dataset("ssv2-cmn", _SSV2_PAPER, AdaptationRecipe(**_SGD, epochs=25),
            split_folder="ssv2_CMN", flat=True, flip=False, family="ssv2"),
    Dataset("kinetics", PaperRecipe(epochs=200, lr_step=20, lr_gamma=0.9, momentum=0.0,
                                    val_every=5),
            AdaptationRecipe(**_SGD, epochs=25), split_folder="kinetics_CMN",
            class_spellings=True),
    Dataset("custom", None,
            AdaptationRecipe(optimizer="adamw", lr=1e-3, momentum=0.9, weight_decay=0.05,
                             epochs=30, batch_size=16)),
    # the synth command's cache: a short schedule of more, smaller SGD steps (it is learnt in a
    # few epochs); no videos, so no extraction or adaptation
    Dataset("synthetic", PaperRecipe(epochs=10, lr_step=5, lr_gamma=0.5, momentum=0.9,
                                     val_every=1, tasks_per_batch=4), videos=False),
)}
# The paper recipe train-heads takes for a cache of a dataset without a record.
DEFAULT_PAPER_RECIPE = "ucf101"


def video_datasets() -> tuple[str, ...]:
    """The names extract and adapt-backbone take (``--dataset``'s choices), as of now."""
    return tuple(name for name, record in DATASETS.items() if record.videos)


def video_family(name: str) -> str:
    """The dataset whose videos ``name``'s lists name (itself unless a record says otherwise;
    a name without a record, e.g. from an older provenance file, is its own family)."""
    record = DATASETS.get(name)
    return record.family or name if record is not None else name
