"""A dataset is one record (cache/datasets.py): its recipes resolve to exactly the values they had
before the records (written out here as literals), and a record added to the table is a
--dataset choice of extract and adapt-backbone and a paper recipe of train-heads."""

import click
import pytest
from click.testing import CliRunner

from align.recipes import PAPER_RECIPES, TrainConfig
from cache import UserError
from cache.datasets import (
    DATASETS,
    AdaptationRecipe,
    Dataset,
    PaperRecipe,
    video_datasets,
    video_family,
)
from cache.options import options_from
from extract.adapt import AdaptConfig, adaptation_recipe
from extract.backbone import same_videos
from extract.datasets import dataset_spec, find_videos
from extract.plan import ExtractConfig

# The values before the records: align/train.py's PAPER_COMMON + PAPER_RECIPES, and
# extract/adapt.py's RECIPES.
PAPER_COMMON = dict(optimizer="sgd", lr=1e-3, weight_decay=0.0, schedule="step", warmup=0,
                    dropout=0.5, patience=0)
OLD_PAPER = {
    "ucf101": dict(epochs=200, lr_step=5, lr_gamma=0.5, momentum=0.9, val_every=5,
                   tasks_per_batch=16),
    "hmdb51": dict(epochs=200, lr_step=5, lr_gamma=0.5, momentum=0.9, val_every=5,
                   tasks_per_batch=16),
    "ssv2": dict(epochs=600, lr_step=30, lr_gamma=0.8, momentum=0.9, val_every=10,
                 tasks_per_batch=16),
    "ssv2-cmn": dict(epochs=600, lr_step=30, lr_gamma=0.8, momentum=0.9, val_every=10,
                     tasks_per_batch=16),
    "kinetics": dict(epochs=200, lr_step=20, lr_gamma=0.9, momentum=0.0, val_every=5,
                     tasks_per_batch=16),
    "synthetic": dict(epochs=10, lr_step=5, lr_gamma=0.5, momentum=0.9, val_every=1,
                      tasks_per_batch=4),
}
SGD = dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, batch_size=64, warmup=1.0)
OLD_ADAPTATION = {
    "ucf101": dict(SGD, epochs=25),
    "hmdb51": dict(SGD, epochs=25),
    "kinetics": dict(SGD, epochs=25),
    "ssv2": dict(SGD, epochs=15),
    "ssv2-cmn": dict(SGD, epochs=25),
    "custom": dict(optimizer="adamw", lr=1e-3, momentum=0.9, weight_decay=0.05, epochs=30,
                   batch_size=16, warmup=1.0),
}


def test_every_records_heads_recipe_is_the_old_literal():
    assert dict(PAPER_RECIPES) == {name: {**PAPER_COMMON, **values}
                                   for name, values in OLD_PAPER.items()}
    for dataset in (*OLD_PAPER, "custom", "mydata"):  # no recipe: ucf101's, and a note
        cfg, notes = TrainConfig(cache="x", recipe="paper").resolve(dataset)
        old = OLD_PAPER.get(dataset, OLD_PAPER["ucf101"])
        assert {k: getattr(cfg, k) for k in {**PAPER_COMMON, **old}} == {**PAPER_COMMON, **old}
        assert bool(notes) == (dataset not in OLD_PAPER), dataset


def test_every_records_adaptation_recipe_is_the_old_literal():
    assert set(video_datasets()) == set(OLD_ADAPTATION)
    for name, old in OLD_ADAPTATION.items():
        assert adaptation_recipe(name) == old, name


def test_layouts_and_families():
    assert [n for n in DATASETS if not DATASETS[n].flip] == ["ssv2", "ssv2-cmn"]
    assert [n for n in DATASETS if DATASETS[n].flat] == ["ssv2", "ssv2-cmn"]
    assert [n for n in DATASETS if DATASETS[n].class_spellings] == ["kinetics"]
    assert video_family("ssv2-cmn") == video_family("ssv2") == "ssv2"
    assert video_family("ucf101") == "ucf101" and video_family("gone") == "gone"
    assert same_videos({"dataset": "ssv2"}, "ssv2-cmn", "/a")
    assert not same_videos({"dataset": "ucf101"}, "hmdb51", "/a")
    # the user's lists: two folders are two datasets
    assert same_videos({"dataset": "custom", "root": "/a"}, "custom", "/a")
    assert not same_videos({"dataset": "custom", "root": "/b"}, "custom", "/a")


def test_a_dataset_with_videos_needs_an_adaptation_recipe():
    with pytest.raises(ValueError, match="needs an adaptation recipe"):
        Dataset("mine", PaperRecipe(epochs=1, lr_step=1, lr_gamma=0.5, momentum=0.9,
                                    val_every=1))


def test_synthetic_is_no_dataset_to_extract():
    assert "synthetic" in DATASETS and "synthetic" not in video_datasets()
    with pytest.raises(UserError, match=r"unknown dataset 'synthetic'; choose one of ucf101"):
        dataset_spec("synthetic")


def dataset_choices(config_class) -> tuple[str, ...]:
    """--dataset's choices of a command generated from ``config_class`` as the CLI does."""
    command = click.command()(options_from(config_class)(lambda **options: None))
    return tuple(next(p for p in command.params if p.name == "dataset").type.choices)


def test_an_added_record_is_a_choice_and_a_recipe(monkeypatch, tmp_path):
    paper = PaperRecipe(epochs=7, lr_step=3, lr_gamma=0.25, momentum=0.5, val_every=2,
                        tasks_per_batch=8)
    adaptation = AdaptationRecipe(optimizer="adamw", lr=2e-3, momentum=0.9, weight_decay=0.01,
                                  epochs=3, batch_size=8)
    assert "mine" not in dataset_choices(ExtractConfig)
    monkeypatch.setitem(DATASETS, "mine", Dataset("mine", paper, adaptation))
    assert "mine" in dataset_choices(ExtractConfig) and "mine" in dataset_choices(AdaptConfig)
    assert adaptation_recipe("mine")["lr"] == 2e-3
    cfg, notes = TrainConfig(cache="x", recipe="paper").resolve("mine")
    assert notes == [] and (cfg.epochs, cfg.lr_step, cfg.lr_gamma, cfg.momentum,
                            cfg.val_every, cfg.tasks_per_batch) == (7, 3, 0.25, 0.5, 2, 8)
    # no vendored lists: it takes the user's, and says which option gives them
    (tmp_path / "root").mkdir()
    with pytest.raises(UserError, match="--dataset mine needs --split-dir"):
        find_videos("mine", tmp_path / "root")
    command = click.command()(options_from(AdaptConfig)(lambda **options: None))
    result = CliRunner().invoke(command, ["--dataset", "mine"])
    assert result.exit_code == 0, result.output
    refused = CliRunner().invoke(command, ["--dataset", "yours"])
    assert refused.exit_code == 2 and "'yours' is not one of" in refused.output
