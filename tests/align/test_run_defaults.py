"""Issue 24 ("also seen"): commands that score a run take its way and tell what its checkpoint
is, and a command's no-run message names only options it has."""

import json

import pytest
import torch
from click.testing import CliRunner

from align.recipes import TrainConfig
from align.train import train
from cache.synthetic import SynthConfig, generate_synthetic
from cli import cli

TINY = dict(channels=8, frames=8, size=4, train_classes=6, val_classes=5, test_classes=5,
            videos_per_class=6)


@pytest.fixture(scope="module")
def three_way_run(tmp_path_factory):
    """A finished 3-way 1-shot TA2N run (runs/latest.json names it) in a working directory."""
    work = tmp_path_factory.mktemp("three_way")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        generate_synthetic("a.zarr", SynthConfig(**TINY, seed=2), progress=False)
        train(TrainConfig(cache="a.zarr", out="run", head="ta2n", way=3, shot=1, queries=2,
                          epochs=1, episodes_per_epoch=2, tasks_per_batch=1, val_every=1,
                          val_episodes=2),
              device=torch.device("cpu"), progress=False, log=lambda message: None)
    return work


def run(args, where, monkeypatch):
    monkeypatch.chdir(where)
    return CliRunner().invoke(cli, args)


def test_evaluate_takes_the_runs_way(three_way_run, monkeypatch):
    result = run(["evaluate", "--episodes", "2", "--report", "way.json"], three_way_run,
                 monkeypatch)
    assert result.exit_code == 0, result.output
    assert "3-way 1-shot" in result.output
    assert json.loads((three_way_run / "way.json").read_text())["way"] == 3


def test_an_explicit_way_still_wins(three_way_run, monkeypatch):
    result = run(["evaluate", "--episodes", "2", "--way", "4", "--report", "way4.json"],
                 three_way_run, monkeypatch)
    assert result.exit_code == 0, result.output
    assert json.loads((three_way_run / "way4.json").read_text())["way"] == 4


def test_visualize_draws_the_runs_way(three_way_run, monkeypatch):
    result = run(["visualize", "--episodes", "1", "--pairs", "true", "--out", "figs"],
                 three_way_run, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "3 pair figures" in result.output  # one per query: 3 classes x 1 query


def test_a_wrong_shots_for_a_checkpoint_says_what_it_is(three_way_run, monkeypatch):
    result = run(["evaluate", "--episodes", "2", "--shots", "5", "--report", "five.json"],
                 three_way_run, monkeypatch)
    assert result.exit_code == 1
    assert "this checkpoint is 1-shot" in result.output and "--shots 1" in result.output
    assert "missing" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command, offers_head", [
    (["visualize"], False),
    (["evaluate"], True),
])
def test_the_no_run_message_names_only_the_commands_options(tmp_path, monkeypatch, command,
                                                             offers_head):
    result = run(command, tmp_path, monkeypatch)
    assert result.exit_code == 1 and "no run trained yet" in result.output, result.output
    assert ("--head" in result.output) == offers_head
