"""Training: it learns, resumes exactly, refuses bad input, and feeds the heads from the cache."""

import csv
import json
import os
import signal

import numpy as np
import pytest
import torch

from align.checkpoints import load_head, load_head_checkpoint
from align.evaluate import EvalConfig, evaluate
from align.feed import Feeder, choose_preload
from align.models import build_head
from align.recipes import TrainConfig
from align.train import train
from cache import FeatureCache, UserError

CPU = torch.device("cpu")
QUIET = dict(device=CPU, progress=False, log=lambda message: None)


def tiny_config(cache, out, **overrides):
    cfg = dict(cache=cache, out=str(out), shot=1, queries=2, epochs=2, episodes_per_epoch=6,
               tasks_per_batch=4, lr_step=1, lr_gamma=0.5, decay_every=1, val_every=1,
               val_episodes=4, momentum=0.9, recipe="paper")
    return TrainConfig(**{**cfg, **overrides})


@pytest.fixture
def tiny(tmp_path, monkeypatch, make_synth):
    monkeypatch.chdir(tmp_path)  # runs/latest.json lands in the test's folder
    return make_synth(tmp_path / "tiny.zarr")


@pytest.mark.slow
def test_short_training_lowers_the_loss_and_beats_protonet(tmp_path, monkeypatch, make_synth):
    """TA2N (TTM + TC) trained for a few hundred episodes clearly beats frame-wise ProtoNet on
    the synthetic cache, whose classes are orders of shared patterns, misaligned in time."""
    monkeypatch.chdir(tmp_path)
    cache_path = make_synth(tmp_path / "synth.zarr", channels=16, size=4, videos_per_class=10,
                            train_classes=32, val_classes=8, test_classes=16, seed=0)
    # Training here is chaotic in float32 (TTM's warp has a one-sided gradient at integer
    # positions): exact re-formulations of the head (e.g. the factored path vs the maps path,
    # equal to 1e-14 over 150 SGD steps in float64) follow the same trajectory for ~20
    # episodes, then rounding sends them apart. Seeds 1-3 learn with every form; seed 0's
    # factored trajectory happens not to lower the loss by 1 within 3 epochs.
    cfg = TrainConfig(cache=cache_path, out=str(tmp_path / "run"), head_options={"sc": False},
                      shot=1, queries=5,
                      epochs=3, episodes_per_epoch=100, val_every=3, val_episodes=100, seed=1)
    summary = train(cfg, **QUIET)  # the fast recipe: Adam, lr 1e-3, cosine over 300 episodes
    losses = [row["train_loss"] for row in summary["history"]]
    assert losses[-1] < losses[0] - 1, losses
    with FeatureCache.open(cache_path) as cache:
        episodes = EvalConfig(episodes=300, shot=1)
        ta2n = evaluate(load_head(tmp_path / "run" / "best.pt"), cache, episodes, device=CPU,
                        progress=False)
        protonet = evaluate(build_head("protonet", channels=16, frames=8, height=4, width=4),
                            cache, episodes, device=CPU, progress=False)
    assert ta2n["accuracy"] > protonet["accuracy"] + 5, (ta2n["summary"], protonet["summary"])


FAST_MID_BATCH = dict(recipe="fast", momentum=None, lr_step=None, lr_gamma=None,
                      schedule="cosine", warmup=5)  # Adam, 4 tasks per step, warm-up, cosine


@pytest.mark.parametrize("recipe", [{}, FAST_MID_BATCH], ids=["paper", "fast"])
@pytest.mark.slow
def test_resume_after_ctrl_c_equals_an_uninterrupted_run(tiny, tmp_path, recipe):
    """Ctrl-C in the middle of a gradient-accumulation batch, then --resume: the final weights,
    BatchNorm statistics, SC step, optimizer state and metrics equal those of a straight run."""
    straight = train(tiny_config(tiny, tmp_path / "straight", **recipe), **QUIET)
    assert not straight["interrupted"] and straight["epochs_done"] == 2

    def interrupt(epoch, episode):
        if (epoch, episode) == (0, 3):
            os.kill(os.getpid(), signal.SIGINT)  # the real signal path, handled by train

    stopped = train(tiny_config(tiny, tmp_path / "resumed", **recipe), on_episode=interrupt,
                    **QUIET)
    assert stopped["interrupted"] and stopped["epochs_done"] == 0
    _, state = load_head_checkpoint(tmp_path / "resumed" / "last.pt")
    assert (state["epoch"], state["episode"]) == (0, 3) and state["grads"] is not None
    resumed = train(resume=str(tmp_path / "resumed"), **QUIET)
    assert not resumed["interrupted"] and resumed["epochs_done"] == 2

    for name in ("last.pt", "best.pt"):
        a = torch.load(tmp_path / "straight" / name, weights_only=False)
        b = torch.load(tmp_path / "resumed" / name, weights_only=False)
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), (name, key)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)["extra"]
    assert float(load_head(tmp_path / "resumed" / "last.pt").sc.delta) == pytest.approx(0.05)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["extra"]
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]  # lr included
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, state in a["optimizer"]["state"].items():
        assert state.keys() == b["optimizer"]["state"][key].keys()
        for name, value in state.items():  # momentum_buffer (SGD); step, exp_avg... (Adam)
            assert torch.equal(torch.as_tensor(value),
                               torch.as_tensor(b["optimizer"]["state"][key][name])), name

    def metrics(run):
        with open(tmp_path / run / "metrics.csv") as f:
            return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "episodes_per_s")}
                    for row in csv.DictReader(f)]

    assert metrics("straight") == metrics("resumed") and len(metrics("straight")) == 2


@pytest.mark.slow
def test_run_directory_records_everything(tiny, tmp_path):
    summary = train(tiny_config(tiny, tmp_path / "run", epochs=1), **QUIET)
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["cache"] == tiny and config["train"]["lr_step"] == 1
    # both configs: what was asked for, and what the recipe and the cache made of it
    requested, resolved = config["requested"], config["train"]
    assert (requested["optimizer"], requested["schedule"], requested["dataset"]) == \
        (None, None, None)
    assert (resolved["optimizer"], resolved["schedule"], resolved["dataset"]) == \
        ("sgd", "step", "synthetic")
    assert requested["epochs"] == resolved["epochs"] == 1
    assert config["head"]["kind"] == "ta2n" and config["head"]["channels"] == 8
    assert config["cache_attrs"]["dataset"] == "synthetic"
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["val_acc"]) == summary["best_val_acc"]
    _, extra = load_head_checkpoint(run / "last.pt")
    assert {"optimizer", "rng", "epoch", "episode"} <= set(extra)
    latest = json.loads((tmp_path / "runs" / "latest.json").read_text())
    assert latest["checkpoint"] == str(run / "best.pt") and latest["shot"] == 1
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_config(tiny, run), **QUIET)


def test_paper_recipe_defaults_come_from_the_dataset():
    cfg, notes = TrainConfig(cache="x", recipe="paper").resolve("ucf101")
    assert notes == []
    assert (cfg.epochs, cfg.lr_step, cfg.lr_gamma, cfg.momentum) == (200, 5, 0.5, 0.9)
    cfg, _ = TrainConfig(cache="x", recipe="paper").resolve("ssv2")
    assert (cfg.epochs, cfg.lr_step, cfg.lr_gamma, cfg.momentum) == (600, 30, 0.8, 0.9)
    cfg, _ = TrainConfig(cache="x", epochs=7, recipe="paper").resolve("kinetics")
    assert (cfg.epochs, cfg.lr_step, cfg.lr_gamma, cfg.momentum) == (7, 20, 0.9, 0.0)
    cfg, notes = TrainConfig(cache="x", recipe="paper").resolve("mydata")
    assert "no recipe" in notes[0] and cfg.epochs == 200
    cfg, _ = TrainConfig(cache="x", recipe="paper").resolve("synthetic")
    assert cfg.epochs < 200 and cfg.dataset == "synthetic" and cfg.tasks_per_batch == 4
    cfg, _ = TrainConfig(cache="x", recipe="paper").resolve("hmdb51")
    assert (cfg.lr, cfg.episodes_per_epoch, cfg.tasks_per_batch, cfg.dropout) == \
        (1e-3, 200, 16, 0.5)


def test_resolving_leaves_the_request_as_it_was():
    """resolve() returns a new config; the request keeps its None (what the user did not ask
    for), so that config.json can record both."""
    request = TrainConfig(cache="x", recipe="paper", lr_step=3)
    cfg, _ = request.resolve("ucf101")
    assert cfg is not request
    assert (request.epochs, request.optimizer, request.schedule, request.dataset) == \
        (None, None, None, None)
    assert (cfg.epochs, cfg.optimizer, cfg.schedule, cfg.lr_step, cfg.dataset) == \
        (200, "sgd", "step", 3, "ucf101")


@pytest.mark.slow
def test_bad_input_is_refused_clearly(tiny, tmp_path, make_synth):
    with pytest.raises(UserError, match="no cache at"):
        train(tiny_config(str(tmp_path / "missing.zarr"), tmp_path / "a"), **QUIET)
    with pytest.raises(UserError, match="split 'val' has 5 classes with done videos, fewer "
                                        "than --way 6"):
        train(tiny_config(tiny, tmp_path / "b", way=6), **QUIET)
    few = make_synth(tmp_path / "few.zarr", videos_per_class=3)
    with pytest.raises(UserError, match=r"class 'seq-\d{4}' \(3\).* K \+ Q = 1 \+ 5 = 6"):
        train(tiny_config(few, tmp_path / "c", queries=5), **QUIET)
    # a run resumed on a cache whose maps do not fit its head
    train(tiny_config(tiny, tmp_path / "d", epochs=1), **QUIET)
    wide = make_synth(tmp_path / "wide.zarr", channels=12)
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    config["train"]["cache"] = wide
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="features do not match the head: channels 8"):
        train(resume=str(tmp_path / "d"), **QUIET)


@pytest.mark.slow
def test_training_draws_random_views_of_an_augmented_cache(tmp_path, monkeypatch, make_synth):
    monkeypatch.chdir(tmp_path)
    path = make_synth(tmp_path / "aug.zarr", aug_views=3)
    messages = []
    train(tiny_config(path, tmp_path / "run", epochs=1,
                      head_options={"sc": False}), device=CPU, progress=False,
          log=messages.append)
    assert any("random views of 3" in m for m in messages), messages


def test_training_free_head_is_validated_not_trained(tiny, tmp_path):
    summary = train(tiny_config(tiny, tmp_path / "p", head="protonet"), **QUIET)
    assert summary["epochs_done"] == 0 and summary["best_val_acc"] is not None
    assert load_head(tmp_path / "p" / "best.pt").config.kind == "protonet"


def test_feeder_serves_the_same_maps_in_every_mode(tmp_path, make_synth):
    path = make_synth(tmp_path / "aug.zarr", aug_views=2)
    with FeatureCache.open(path) as cache:
        rows = cache.rows("train")[[5, 0, 17, 5]]
        stored = torch.from_numpy(cache.read_rows(rows)).float()
        served = {}
        for mode in ("ram", "none", "device"):
            feeder = Feeder(cache, "train", device=CPU, preload=mode, progress=False)
            assert feeder.mode == ("ram" if mode == "device" else mode)
            served[mode] = feeder.load(rows)
            streamed = list(feeder.stream([(rows, None), (rows[:2], None)]))
            assert torch.equal(streamed[0], served[mode]) and streamed[1].shape[0] == 2
        for mode, maps in served.items():
            assert maps.dtype == torch.float32 and torch.equal(maps, stored), mode
        views = np.array([1, 0, 1, 1])
        expected = np.stack([cache.read_row(r, view=v) for r, v in zip(rows, views)])
        for mode in ("ram", "none"):
            feeder = Feeder(cache, "train", device=CPU, preload=mode, aug=True, progress=False)
            assert torch.equal(feeder.load(rows, views), torch.from_numpy(expected).float())
    mode, why = choose_preload("auto", 10**15, CPU)
    assert mode == "none" and "streaming" in why
    assert choose_preload("auto", 1000, CPU)[0] == "ram"


def test_micro_batches_never_straddle_an_sgd_step():
    from align.train import micro_batches

    groups = list(micro_batches(range(3, 14), 0, 4, 3))  # steps after episodes 4, 8, 12
    assert groups == [[3], [4, 5, 6], [7], [8, 9, 10], [11], [12, 13]]
    assert [len(g) for g in micro_batches(range(6), 0, 16, 4)] == [4, 2]


@pytest.mark.slow
def test_micro_batched_training_equals_one_episode_per_pass(tiny, tmp_path):
    """Episodes batched 3 per forward / backward pass (groups cut at SGD steps): the same
    weights, BatchNorm statistics and metrics as one episode per pass, to float32 rounding."""
    runs = {}
    for micro in (1, 3):
        messages = []
        train(tiny_config(tiny, tmp_path / f"m{micro}", micro_batch=micro), device=CPU,
              progress=False, log=messages.append)
        assert f"micro-batch {micro} (as asked)" in " ".join(messages)
        runs[micro] = torch.load(tmp_path / f"m{micro}" / "last.pt", weights_only=False)
    for key, value in runs[1]["state_dict"].items():
        torch.testing.assert_close(runs[3]["state_dict"][key], value, rtol=1e-4, atol=1e-5,
                                   msg=key)
    losses = [[row["train_loss"] for row in r["extra"]["history"]] for r in runs.values()]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
