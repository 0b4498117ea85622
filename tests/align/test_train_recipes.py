"""Recipes: `paper` is exactly the old default, the lr schedules equal torch's, early stopping
stops (and says why), and impossible combinations are refused."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import cli
from align.recipes import (
    FAST_RECIPE,
    OPTIMIZERS,
    PAPER_RECIPES,
    RECIPE_NAMES,
    SCHEDULES,
    TrainConfig,
    learning_rate,
    make_optimizer,
    steps_per_epoch,
    validations_since_best,
)
from align.train import train
from cache import UserError


def resolved(dataset="synthetic", **values) -> TrainConfig:
    return TrainConfig(cache="x", **values).resolve(dataset)[0]


def old_lr_per_epoch(cfg: TrainConfig) -> list[float]:
    """The lr of every epoch as the code before the recipes made it: SGD(lr) and StepLR(lr_step,
    lr_gamma) stepped once at the end of each epoch."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step,
                                                gamma=cfg.lr_gamma)
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("dataset", [*PAPER_RECIPES, "mydata"])
def test_paper_recipe_is_exactly_the_old_default(dataset):
    """--recipe paper: the same SGD (lr, momentum, weight decay, dampening, nesterov), the old
    per-dataset values, and bit for bit the lr the old per-epoch StepLR gave at every step."""
    cfg = resolved(dataset, recipe="paper", shot=1)
    old = PAPER_RECIPES.get(dataset, PAPER_RECIPES["ucf101"])
    for key, value in old.items():
        assert getattr(cfg, key) == value, key
    assert (cfg.lr, cfg.weight_decay, cfg.dropout, cfg.episodes_per_epoch) == (1e-3, 0, 0.5, 200)
    assert (cfg.warmup, cfg.patience, cfg.val_episodes, cfg.decay_every) == (0, 0, 500, 40)
    params = [torch.nn.Parameter(torch.zeros(3))]
    ours = make_optimizer(params, cfg)
    before = torch.optim.SGD(params, lr=1e-3, momentum=old["momentum"], weight_decay=0.0)
    assert type(ours) is torch.optim.SGD and ours.defaults == before.defaults
    spe = steps_per_epoch(cfg)
    assert spe == -(-200 // old["tasks_per_batch"])  # 200 episodes, a step per batch + the rest
    for epoch, lr in enumerate(old_lr_per_epoch(cfg)):
        assert {learning_rate(cfg, epoch * spe + i) for i in range(spe)} == {lr}, epoch


def test_fast_recipe_is_the_default_for_every_dataset():
    for dataset in (*PAPER_RECIPES, "mydata"):
        cfg = resolved(dataset)
        assert cfg.recipe == "fast"
        for key, value in FAST_RECIPE.items():
            assert getattr(cfg, key) == value, (dataset, key)
        assert cfg.momentum is None and cfg.lr_step is None  # not SGD, not the step schedule
    assert resolved("ucf101", recipe="fast", epochs=3, dropout=0.1).epochs == 3
    assert TrainConfig().resolve("mydata")[1] == []  # the fast recipe knows every dataset


def test_warmup_and_cosine_equal_torchs_schedulers():
    """learning_rate (a pure function of the step) against torch's LinearLR warm-up followed by
    CosineAnnealingLR, stepped once per optimizer step, in float64."""
    cfg = resolved(optimizer="adam", lr=3e-3, schedule="cosine", warmup=10, tasks_per_batch=2,
                   epochs=3, episodes_per_epoch=25)
    spe, warm = steps_per_epoch(cfg), 5
    total = cfg.epochs * spe
    assert spe == 13
    optimizer = torch.optim.SGD([torch.zeros(1, dtype=torch.float64, requires_grad=True)],
                                lr=cfg.lr)
    schedulers = torch.optim.lr_scheduler
    scheduler = schedulers.SequentialLR(optimizer, [
        schedulers.LinearLR(optimizer, start_factor=1 / warm, total_iters=warm - 1),
        schedulers.CosineAnnealingLR(optimizer, T_max=total - warm)], milestones=[warm])
    for step in range(total):
        assert learning_rate(cfg, step) == pytest.approx(optimizer.param_groups[0]["lr"],
                                                         rel=1e-12, abs=1e-15), step
        optimizer.step()
        scheduler.step()
    assert learning_rate(cfg, warm - 1) == cfg.lr and learning_rate(cfg, total - 1) < 1e-5
    flat = resolved(schedule="constant", warmup=3, tasks_per_batch=1)
    assert [learning_rate(flat, s) for s in (0, 1, 2, 3, 500)] == pytest.approx(
        [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3])


def test_optimizers():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert type(make_optimizer(params, resolved(optimizer="adam"))) is torch.optim.Adam
    adamw = make_optimizer(params, resolved(optimizer="adamw", weight_decay=0.05))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.05
    sgd = make_optimizer(params, resolved(optimizer="sgd"))  # fast + SGD: the paper's momentum
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9
    assert make_optimizer([], resolved()).param_groups[0]["params"][0].shape == (1,)


def test_lr_step_means_the_step_schedule():
    cfg = resolved("hmdb51", lr_step=2)
    assert (cfg.schedule, cfg.lr_step, cfg.lr_gamma) == ("step", 2, 0.5)
    assert learning_rate(cfg, 2 * steps_per_epoch(cfg)) == 0.5 * learning_rate(cfg, 0)


def test_impossible_combinations_are_refused():
    with pytest.raises(UserError, match="--momentum is SGD's"):
        resolved(momentum=0.9)  # the fast recipe's Adam
    with pytest.raises(UserError, match="belong to --schedule step, not cosine"):
        resolved(schedule="cosine", lr_step=3)
    with pytest.raises(UserError, match="--recipe must be one of fast, paper"):
        resolved(recipe="quick")
    with pytest.raises(UserError, match="--optimizer must be one of"):
        resolved(optimizer="lbfgs")
    with pytest.raises(UserError, match="--patience, --warmup and --val-episodes must be >= 0"):
        resolved(patience=-1)
    with pytest.raises(UserError, match="--tasks-per-batch must be at least 1"):
        resolved(tasks_per_batch=0)


def test_cli_choices_are_the_modules():
    params = {p.name: p for p in cli.cli.commands["train-heads"].params}
    assert tuple(params["recipe"].type.choices) == RECIPE_NAMES
    assert tuple(params["optimizer"].type.choices) == OPTIMIZERS
    assert tuple(params["schedule"].type.choices) == SCHEDULES
    assert params["recipe"].default == "fast"


def test_runs_from_before_the_recipes_resume_as_paper():
    old = {"cache": "x", "epochs": 200, "lr": 0.001, "lr_step": 5, "lr_gamma": 0.5,
           "momentum": 0.9, "weight_decay": 0.0, "tasks_per_batch": 16, "dropout": 0.5}
    cfg, _ = TrainConfig.from_json(old).resolve("ucf101")
    assert (cfg.recipe, cfg.optimizer, cfg.schedule, cfg.patience) == ("paper", "sgd", "step", 0)


def test_validations_since_best():
    rows = [{"val_acc": v} for v in (50, None, 60, 55, None, 60, 59)]
    assert validations_since_best(rows) == 3  # a tie is no improvement
    assert validations_since_best(rows[:3]) == 0 and validations_since_best([]) == 0


@pytest.mark.slow
def test_early_stopping_stops_keeps_the_best_and_says_why(tmp_path, monkeypatch, make_synth):
    monkeypatch.chdir(tmp_path)
    cache = make_synth(tmp_path / "tiny.zarr")
    messages = []
    cfg = TrainConfig(cache=cache, out=str(tmp_path / "run"), head_options={"sc": False}, shot=1,
                      queries=2,
                      epochs=40, episodes_per_epoch=2, val_episodes=4, patience=2)
    summary = train(cfg, device=torch.device("cpu"), progress=False, log=messages.append)
    history = summary["history"]
    assert summary["epochs_done"] < 40 and not summary["interrupted"]
    assert validations_since_best(history) == 2 and validations_since_best(history[:-1]) == 1
    best = max(history, key=lambda row: row["val_acc"])
    assert summary["best_val_acc"] == pytest.approx(best["val_acc"], abs=1e-3)
    saved = torch.load(tmp_path / "run" / "best.pt", weights_only=False)["extra"]
    assert saved["epoch"] == best["epoch"]
    why = f"early stop after epoch {len(history)}/40"
    assert summary["stopped"].startswith(why) and f"since epoch {best['epoch']}" in \
        summary["stopped"]
    assert any(m.startswith(why) for m in messages)
    assert any(m.startswith("recipe fast: adam lr 0.001") for m in messages), messages
    # resuming a run that stopped early trains nothing more and says why again
    again = train(resume=str(tmp_path / "run"), device=torch.device("cpu"), progress=False,
                  log=lambda m: None)
    assert again["stopped"] == summary["stopped"] and again["history"] == history


@pytest.mark.slow
def test_train_heads_with_only_shots_stops_by_itself(tmp_path, monkeypatch, make_synth):
    """`train-heads --shots 5` on the latest (synthetic) cache: the fast recipe stops early and
    says why. Only the sizes are shrunk (episodes per epoch, validation), not the recipe."""
    monkeypatch.chdir(tmp_path)
    make_synth(tmp_path / "caches" / "tiny.zarr", videos_per_class=10)
    result = CliRunner().invoke(cli.cli, [
        "train-heads", "--shots", "5", "--queries", "1", "--head-option", "sc=false",
        "--episodes-per-epoch", "2",
        "--val-episodes", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "recipe fast: adam" in result.output
    assert "stopped    early stop after epoch" in result.output
    run = Path(json.loads((tmp_path / "runs" / "latest.json").read_text())["run"])
    config = json.loads((run / "config.json").read_text())["train"]
    assert (config["recipe"], config["patience"], config["shot"]) == ("fast", 5, 5)
