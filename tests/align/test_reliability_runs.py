"""Issue 24 (phase two): a head is never scored on features of another backbone without saying
so, a resumed run trains what its checkpoint holds, a run folder has one writer, a cache
rebuilt under a streaming reader stops it, and no command writes over a folder it did not make."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from align.feed import Feeder
from align.recipes import TrainConfig
from align.train import train
from cache import FeatureCache, UserError
from cache.paths import writer_lock
from cache.synthetic import SynthConfig, generate_synthetic
from cli import cli

QUIET = dict(device=torch.device("cpu"), progress=False, log=lambda message: None)
TINY = dict(channels=8, frames=8, size=4, train_classes=6, val_classes=5, test_classes=5,
            videos_per_class=6)


def synth(path, seed):
    generate_synthetic(str(path), SynthConfig(**TINY, seed=seed), progress=False)
    return str(path)


def tiny(cache, out, **overrides):
    return TrainConfig(**{**dict(cache=cache, out=str(out), head="protonet", shot=1, queries=2,
                                 epochs=1, episodes_per_epoch=2, tasks_per_batch=1,
                                 val_every=1, val_episodes=2), **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch TA2N run on cache a.zarr, and b.zarr: same shape, other features."""
    work = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        synth("a.zarr", seed=2), synth("b.zarr", seed=3)
        train(tiny("a.zarr", "run", head="ta2n"), **QUIET)  # relative: copies stay whole
    return work


@pytest.fixture
def work(trained, tmp_path, monkeypatch):
    """A private copy of the trained run and its caches, as the working directory."""
    for name in ("a.zarr", "b.zarr", "run"):
        shutil.copytree(trained / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def evaluate(*args):
    return CliRunner().invoke(cli, ["evaluate", "--checkpoint", "run/best.pt", "--episodes", "2",
                                    *args])


# ------------------------------------------------------------------------------ item 1
def test_the_run_records_the_feature_fingerprint_of_its_cache(work):
    config = json.loads((work / "run" / "config.json").read_text())
    assert config["features"]["cache"].endswith("a.zarr") and config["features"]["digest"]
    extra = torch.load(work / "run" / "best.pt", weights_only=False)["extra"]
    assert extra["features"]["digest"] == config["features"]["digest"]


def test_a_head_is_not_scored_on_another_caches_features(work):
    result = evaluate("--cache", "b.zarr")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "a.zarr" in result.output and "b.zarr" in result.output
    assert "--allow-other-features" in result.output


@pytest.mark.parametrize("command", [
    ["visualize", "--checkpoint", "run/best.pt", "--cache", "b.zarr"],
    ["analyze", "embedding", "b.zarr", "--checkpoint", "run/best.pt", "--episodes", "1"],
])
def test_visualize_and_analyze_refuse_other_features_too(work, command):
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 1 and "--allow-other-features" in result.output, result.output
    assert "Traceback" not in result.output


def test_allow_other_features_warns_and_the_report_says_so(work):
    result = evaluate("--cache", "b.zarr", "--allow-other-features", "--report", "r.json")
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.output and "b.zarr" in result.output
    report = json.loads((work / "r.json").read_text())
    assert report["cache"]["path"].endswith("b.zarr")
    assert report["features"]["trained_on"]["cache"].endswith("a.zarr")
    assert report["features"]["warning"].startswith("WARNING")


def test_the_same_cache_scores_without_a_warning(work):
    result = evaluate("--cache", "a.zarr", "--report", "r.json")
    assert result.exit_code == 0, result.output
    assert "WARNING" not in result.output and "warning" not in result.output
    assert json.loads((work / "r.json").read_text())["features"]["warning"] is None


def test_an_old_checkpoint_without_a_fingerprint_still_loads_with_a_warning(work):
    payload = torch.load(work / "run" / "best.pt", weights_only=False)
    del payload["extra"]["features"]
    torch.save(payload, work / "run" / "best.pt")
    result = evaluate("--cache", "b.zarr")
    assert result.exit_code == 0, result.output
    assert "records no feature fingerprint" in result.output


def test_resume_on_a_cache_rebuilt_with_other_features_is_refused(work):
    payload = torch.load(work / "run" / "last.pt", weights_only=False)
    payload["extra"]["epoch"] = 0  # as if killed after saving, before the budget was done
    torch.save(payload, work / "run" / "last.pt")
    shutil.rmtree(work / "a.zarr")
    shutil.copytree(work / "b.zarr", work / "a.zarr")  # another extract --overwrite meanwhile
    with pytest.raises(UserError, match="other features"):
        train(resume=str(work / "run"), **QUIET)


# ------------------------------------------------------------------------------ item 2
@pytest.mark.parametrize("field, value", [("head", "otam"), ("lr", 0.5), ("shot", 2)])
def test_resume_refuses_a_config_json_that_disagrees_with_the_checkpoint(work, field, value):
    path = work / "run" / "config.json"
    config = json.loads(path.read_text())
    for section in ("requested", "train"):
        config[section][field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"config.json.*{field}.*last.pt"):
        train(resume=str(work / "run"), **QUIET)


# ------------------------------------------------------------------------------ item 3
def test_a_second_run_into_a_folder_being_written_is_refused(work):
    with writer_lock(work / "run2", what="train-heads"):
        with pytest.raises(UserError, match="being written by another process"):
            train(tiny("a.zarr", work / "run2"), **QUIET)
    assert not (work / "run2" / "config.json").exists()


def test_the_run_lock_is_gone_when_the_run_ends(work):
    train(tiny("a.zarr", work / "run3"), **QUIET)
    assert not (work / "run3.lock").exists() and not (work / "run3" / ".lock").exists()


# ------------------------------------------------------------------------------ item 5
def test_a_streaming_reader_stops_when_its_cache_is_rebuilt(work):
    with FeatureCache.open("a.zarr") as cache:
        feeder = Feeder(cache, "train", device=torch.device("cpu"), preload="none", workers=1,
                        prefetch=1, progress=False)
        rows = feeder.rows[:2]
        stream = feeder.stream((rows, None) for _ in range(50))
        next(stream)
        shutil.rmtree(work / "a.zarr")
        synth(work / "a.zarr", seed=4)  # same shape, other rows: --overwrite by another command
        with pytest.raises(UserError, match="rebuilt"):
            for _ in range(49):
                next(stream)
    assert np.all(rows >= 0)


# ------------------------------------------------------------------------------ item 7
def test_train_heads_never_writes_into_a_users_folder(work):
    mine = work / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my own notes")
    result = CliRunner().invoke(cli, ["train-heads", "--cache", "a.zarr", "--out", "mine",
                                      "--head", "protonet", "--shots", "1", "--epochs", "1"])
    assert result.exit_code == 1 and "not made by this tool" in result.output, result.output
    assert sorted(p.name for p in mine.iterdir()) == ["config.json"]
    assert (mine / "config.json").read_text() == "my own notes"


def test_train_heads_may_write_into_an_empty_folder_and_one_it_made(work):
    (work / "empty").mkdir()
    train(tiny("a.zarr", work / "empty"), **QUIET)
    assert (work / "empty" / "best.pt").exists()
    (work / "empty" / "last.pt").unlink()  # its own folder, no run to resume in it: reused
    train(tiny("a.zarr", work / "empty"), **QUIET)


def test_a_failed_run_leaves_no_empty_folder(work):
    with pytest.raises(UserError):
        train(tiny("a.zarr", work / "failed", way=6), **QUIET)  # 5 val classes: too few
    assert not (work / "failed").exists()


def test_sweep_never_writes_into_a_users_folder(work):
    mine = work / "mine"
    mine.mkdir()
    (mine / "sweep.md").write_text("my table")
    result = CliRunner().invoke(cli, ["sweep", "table3", "--cache", "a.zarr", "--out", "mine",
                                      "--seeds", "0", "--episodes", "2"])
    assert result.exit_code == 1 and "not made by this tool" in result.output, result.output
    assert sorted(p.name for p in mine.iterdir()) == ["sweep.md"]


# ------------------------------------------------------------------------------ item 11
@pytest.mark.parametrize("damage, named", [
    (lambda path: path.unlink(), "config.json is missing"),
    (lambda path: path.write_text(path.read_text()[:40]), "not readable JSON"),
    (lambda path: path.write_text('{"requested": {}}'), "no 'train' section"),
    (lambda path: path.write_text("[1, 2]"), "must hold a JSON object"),
])
def test_resume_with_a_damaged_config_json_is_one_line(work, damage, named):
    damage(work / "run" / "config.json")
    result = CliRunner().invoke(cli, ["train-heads", "--resume", "run"])
    assert result.exit_code == 1 and named in result.output, result.output
    assert "Traceback" not in result.output


def test_from_json_checks_types():
    with pytest.raises(UserError, match="epochs is 'three'.*int or null"):
        TrainConfig.from_json({"epochs": "three"})
    with pytest.raises(UserError, match="compile is 1.*bool"):
        TrainConfig.from_json({"compile": 1})
    assert TrainConfig.from_json({"lr": 1, "epochs": None}).lr == 1.0


# ------------------------------------------------------------------------------ item 12
def saved_episodes(work, **changes):
    from align.episodes import EpisodeSampler, Stream, save_episodes

    with FeatureCache.open("a.zarr") as cache:
        episodes = EpisodeSampler(cache, "test", way=5, shot=1, queries=1, seed=0,
                                  stream=Stream.TEST).episodes(0, 2)
        save_episodes(work / "ep.json", episodes, cache, split="test", seed=0)
    payload = json.loads((work / "ep.json").read_text())
    payload.update(changes)
    (work / "ep.json").write_text(json.dumps(payload))
    return "ep.json"


@pytest.mark.parametrize("changes, named", [
    ({"shot": "abc"}, "shot"), ({"shot": None}, "shot"), ({"way": 0}, "way"),
    ({"split": "val"}, "belongs to the test split"), ({"split": "nonsense"}, "split"),
])
def test_a_bad_episode_file_is_one_line(work, changes, named):
    episodes = saved_episodes(work, **changes)
    result = evaluate("--cache", "a.zarr", "--episodes-from", episodes)
    assert result.exit_code == 1 and named in result.output, result.output
    assert "Traceback" not in result.output


def test_an_episode_file_holding_a_json_list_is_one_line(work):
    (work / "ep.json").write_text("[1, 2, 3]")
    result = evaluate("--cache", "a.zarr", "--episodes-from", "ep.json")
    assert result.exit_code == 1 and "not an episode file" in result.output, result.output


# ------------------------------------------------------------------------------ item 15
@pytest.mark.parametrize("option", [["--episodes", "0"], ["--perplexity", "0"],
                                    ["--shots", "0"], ["--way", "1"], ["--queries", "0"]])
def test_analyze_embedding_refuses_bad_numbers(work, option):
    result = CliRunner().invoke(cli, ["analyze", "embedding", "a.zarr", "--head", "protonet",
                                      *option])
    assert result.exit_code in (1, 2) and option[0] in result.output, result.output
    assert "Traceback" not in result.output


def test_analyze_embedding_help_says_the_default_k_the_code_uses():
    from align.options import DEFAULT_SHOT

    result = CliRunner().invoke(cli, ["analyze", "embedding", "--help"])
    assert f"else {DEFAULT_SHOT}]" in " ".join(result.output.split())


def test_the_embedding_config_checks_its_numbers():
    from align.reports.embedding import EmbeddingConfig

    with pytest.raises(UserError, match="perplexity"):
        EmbeddingConfig(perplexity=0).check()

