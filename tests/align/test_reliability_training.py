"""Issue 10 in phase two: diverged training stops with the last good epoch kept, evaluate refuses a
non-finite checkpoint, every count and rate option is checked up front, and unwritable outputs are
refused before the work."""

import json

import pytest
import torch
from click.testing import CliRunner

from align.checkpoints import load_head, save_head
from align.models import build_head
from align.recipes import TrainConfig
from align.train import train
from cache import UserError
from cli import cli

QUIET = dict(device=torch.device("cpu"), progress=False, log=lambda message: None)


@pytest.fixture
def synth(tmp_path, monkeypatch, make_synth):
    monkeypatch.chdir(tmp_path)
    return make_synth(tmp_path / "s.zarr")


def tiny(cache, out, **overrides):
    return TrainConfig(**{**dict(cache=cache, out=str(out), shot=1, queries=2, epochs=3,
                                 episodes_per_epoch=4, tasks_per_batch=2, val_every=1,
                                 val_episodes=3), **overrides})


@pytest.mark.slow
def test_a_diverging_run_stops_at_once_and_keeps_the_last_good_epoch(synth, tmp_path,
                                                                    monkeypatch):
    def poison(epoch, episode):  # after one good epoch, the weights become NaN
        if epoch == 1 and episode == 1:
            with torch.no_grad():
                next(p for p in head_params[0] if p.requires_grad).fill_(float("nan"))

    head_params = []
    import align.train as train_module

    original = train_module.make_optimizer

    def spy(params, cfg):
        head_params.append(params)
        return original(params, cfg)

    monkeypatch.setattr(train_module, "make_optimizer", spy)
    with pytest.raises(UserError, match="training diverged at epoch 2"):
        train(tiny(synth, tmp_path / "run"), on_episode=poison, **QUIET)
    for name in ("best.pt", "last.pt"):  # both still the first, finite epoch
        head = load_head(tmp_path / "run" / name)
        assert all(torch.isfinite(v).all() for v in head.state_dict().values()
                   if v.is_floating_point())


def test_evaluate_refuses_a_non_finite_checkpoint(synth, tmp_path):
    head = build_head("ta2n", channels=8, frames=8, height=4, width=4)
    with torch.no_grad():
        next(head.parameters()).fill_(float("nan"))
    save_head(head, tmp_path / "nan.pt")
    result = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(tmp_path / "nan.pt"),
                                      "--cache", synth, "--episodes", "2"])
    assert result.exit_code == 1 and "non-finite weights" in result.output


@pytest.mark.parametrize("option", [
    ["--shots", "0"], ["--way", "1"], ["--queries", "0"], ["--tasks-per-batch", "0"],
    ["--episodes-per-epoch", "0"], ["--lr-step", "0"], ["--val-every", "0"], ["--lr", "nan"],
    ["--lr", "0"], ["--dropout", "1.0"], ["--dropout", "-0.5"], ["--epochs", "0"],
    ["--val-episodes", "-1"], ["--batch-episodes", "0"], ["--patience", "-1"],
])
@pytest.mark.slow
def test_train_heads_refuses_bad_numbers_before_any_work(synth, option):
    result = CliRunner().invoke(cli, ["train-heads", "--cache", synth, *option])
    # 2: click's range check; 1: the config check (NaN passes click's comparisons)
    assert result.exit_code in (1, 2) and option[0] in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("option", [["--shots", "0"], ["--episodes", "0"], ["--way", "0"],
                                    ["--queries", "0"], ["--batch-episodes", "0"]])
def test_evaluate_refuses_bad_counts(synth, option):
    result = CliRunner().invoke(cli, ["evaluate", "--head", "protonet", "--cache", synth,
                                      *option])
    assert result.exit_code == 2 and option[0] in result.output


def test_the_api_refuses_what_the_cli_refuses(synth, tmp_path):
    for bad in (dict(dropout=1.0), dict(lr=float("nan")), dict(shot=0), dict(lr_step=0)):
        with pytest.raises(UserError):
            train(tiny(synth, tmp_path / "run", **bad), **QUIET)


def test_a_report_path_that_cannot_be_written_is_refused_before_evaluating(synth, tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    result = CliRunner().invoke(cli, ["evaluate", "--head", "protonet", "--cache", synth,
                                      "--episodes", "3", "--report", str(folder)])
    assert result.exit_code == 1 and "--report" in result.output
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob("**/*.tmp"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(cli, ["train-heads", "--cache", synth, "--out",
                                      str(blocker / "run")])
    assert result.exit_code == 1 and "--out" in result.output
    json.dumps(result.output)  # one printable line, no traceback object
