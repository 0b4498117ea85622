"""Evaluation: the paper's CI, the JSON report, exact replay of episode lists, the CLI."""

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from align.checkpoints import save_head
from align.episodes import Episode
from align.evaluate import (
    EvalConfig,
    confidence_interval,
    evaluate,
    evaluate_command,
    format_result,
    score,
)
from align.models import build_head
from align.options import DEFAULT_SHOT
from cache import FeatureCache, UserError
from cli import cli

CPU = torch.device("cpu")


@pytest.fixture
def synth(tmp_path, monkeypatch, make_synth):
    monkeypatch.chdir(tmp_path)  # caches/latest.json and runs/ land in the test's folder
    return make_synth(tmp_path / "synth.zarr", test_classes=6, seed=1)


def test_confidence_interval_is_the_papers():
    acc = np.array([100.0, 0.0, 100.0, 100.0])
    assert confidence_interval(acc) == pytest.approx(1.96 * acc.std() / 2)
    assert confidence_interval(acc) == pytest.approx(42.4352447854375)
    assert confidence_interval(np.full(10, 60.0)) == 0.0
    assert format_result(5, 5, "test", 89.634, 0.2712, 5000) == \
        "5-way 5-shot test: 89.63 +- 0.27 (5000 episodes)"


def test_score_per_class_and_confusion():
    # two 2-way episodes with 2 queries per class over cache labels 3, 7, 9
    episodes = [Episode(np.array([3, 7]), np.array([0, 1]), np.array([2, 3, 4, 5])),
                Episode(np.array([9, 3]), np.array([0, 1]), np.array([2, 3, 4, 5]))]
    preds = np.array([[0, 1, 1, 1],    # class 3: 1 of 2 right, class 7: 2 of 2
                      [0, 0, 1, 0]])   # class 9: 2 of 2, class 3: 1 of 2
    names = [f"k{i}" for i in range(10)]
    result = score(episodes, preds, names)
    assert result["episode_accuracy"] == [75.0, 75.0]
    assert result["accuracy"] == 75.0 and result["ci95"] == 0.0
    assert result["per_class_accuracy"] == {"k3": 50.0, "k7": 100.0, "k9": 100.0}
    assert result["confusion"]["classes"] == ["k3", "k7", "k9"]
    assert result["confusion"]["matrix"] == [[2, 1, 1], [0, 2, 0], [0, 0, 2]]


def test_report_says_how_the_number_was_made(synth, tmp_path):
    report = tmp_path / "report.json"
    with FeatureCache.open(synth) as cache:
        c, t, h, w = cache.shape
        head = build_head("protonet", channels=c, frames=t, height=h, width=w, shot=2)
        out = evaluate(head, cache, EvalConfig(episodes=30, shot=2, seed=4), device=CPU,
                       head_config={"kind": "protonet"}, report=str(report), progress=False)
    saved = json.loads(report.read_text())
    assert saved["summary"] == out["summary"]
    acc = np.array(saved["episode_accuracy"])
    assert len(acc) == saved["episodes"] == 30
    assert saved["accuracy"] == pytest.approx(acc.mean())
    assert saved["ci95"] == pytest.approx(1.96 * acc.std() / np.sqrt(30))
    assert out["summary"] == format_result(5, 2, "test", acc.mean(), saved["ci95"], 30)
    assert saved["seed"] == 4 and saved["shot"] == 2 and saved["split"] == "test"
    matrix = np.array(saved["confusion"]["matrix"])
    assert matrix.sum() == 30 * 5 and len(saved["per_class_accuracy"]) == 6
    assert saved["cache"]["attrs"]["dataset"] == "synthetic"
    assert "windows" not in saved["cache"]["attrs"]["synthetic"]  # per-row truth left out
    assert saved["episodes_per_s"] > 0 and saved["wall_time_s"] > 0
    assert saved["head"] == {"kind": "protonet"}


@pytest.mark.slow
def test_replaying_an_episode_list_reproduces_the_accuracy(synth, tmp_path):
    ckpt = tmp_path / "head.pt"
    save_head(build_head("ta2n", channels=8, frames=8, height=4, width=4, shot=1, seed=3), ckpt)
    episodes_file = str(tmp_path / "episodes.json")
    first = evaluate_command(EvalConfig(episodes=12, seed=9, save_episodes=episodes_file,
                                        batch_episodes=5),
                             checkpoint=str(ckpt), head_kind=None, cache_path=synth, shot=1,
                             device=CPU, report=str(tmp_path / "a.json"), log=lambda m: None,
                             progress=False)
    # another seed and batch size: the file decides the episodes, batching changes nothing
    request = EvalConfig(episodes=999, seed=0, episodes_from=episodes_file, batch_episodes=1)
    again = evaluate_command(request, checkpoint=str(ckpt), head_kind=None, cache_path=synth,
                             shot=None, device=CPU, report=str(tmp_path / "b.json"),
                             log=lambda m: None, progress=False)
    assert again["episodes"] == 12 and again["seed"] == 9
    # the report keeps the request next to what the file made of it; the request is untouched
    assert (again["requested"]["episodes"], again["requested"]["seed"]) == (999, 0)
    assert (request.episodes, request.seed, request.shot) == (999, 0, DEFAULT_SHOT)
    assert again["episode_accuracy"] == first["episode_accuracy"]
    assert again["summary"] == first["summary"]
    assert again["confusion"] == first["confusion"]


def test_authors_checkpoint_evaluates_like_ours(synth, tmp_path):
    """A checkpoint in the authors' format (no T, H, W recorded) runs on the cache's 4 x 4 maps
    and scores exactly like the same weights saved by this project."""
    head = build_head("ta2n", channels=8, frames=8, height=4, width=4, shot=1, seed=5)
    ours = tmp_path / "ours.pt"
    save_head(head, ours)
    rename = {"ttm.": "firststage.", "tc.": "secondstage.", "sc.mvnet.": "secondstage.mvnet."}
    authors = {}
    for key, value in head.state_dict().items():
        if key == "sc.delta":
            continue
        prefix = next(p for p in rename if key.startswith(p))
        authors["module.align." + rename[prefix] + key[len(prefix):]] = value
    theirs = tmp_path / "authors.pth"
    torch.save({"model_state_dict": authors, "iteration": 1234}, theirs)
    common = dict(head_kind=None, cache_path=synth, shot=1, device=CPU, log=lambda m: None,
                  progress=False)
    a = evaluate_command(EvalConfig(episodes=10), checkpoint=str(ours),
                         report=str(tmp_path / "a.json"), **common)
    b = evaluate_command(EvalConfig(episodes=10), checkpoint=str(theirs),
                         report=str(tmp_path / "b.json"), **common)
    assert b["episode_accuracy"] == a["episode_accuracy"]
    assert b["checkpoint_config"]["source"] == "authors"
    assert b["checkpoint_config"]["iteration"] == 1234
    assert (b["head"]["height"], b["head"]["width"]) == (4, 4)


def test_bad_requests_are_refused(synth, tmp_path):
    ckpt = tmp_path / "wide.pt"
    save_head(build_head("ta2n", channels=16, frames=8, height=4, width=4, shot=1), ckpt)
    common = dict(cache_path=synth, shot=1, device=CPU, report=None, log=lambda m: None,
                  progress=False)
    with pytest.raises(UserError, match="do not match the head: channels 16"):
        evaluate_command(EvalConfig(episodes=2), checkpoint=str(ckpt), head_kind=None, **common)
    with pytest.raises(UserError, match="--checkpoint"):
        evaluate_command(EvalConfig(episodes=2), checkpoint=None, head_kind="ta2n", **common)
    with pytest.raises(UserError, match="not both"):
        evaluate_command(EvalConfig(episodes=2), checkpoint=str(ckpt), head_kind="otam",
                         **common)
    with pytest.raises(UserError, match="no cache"):
        evaluate_command(EvalConfig(episodes=2), checkpoint=None, head_kind="otam",
                         **{**common, "cache_path": str(tmp_path / "nothing.zarr")})


@pytest.mark.slow
def test_cli_synth_train_evaluate_end_to_end(tmp_path, monkeypatch):
    """The bare commands in sequence: synth -> train-heads -> evaluate, each finding the last."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    run("synth", "--channels", "8", "--size", "4", "--videos-per-class", "6",
        "--train-classes", "6", "--test-classes", "6")
    out = run("train-heads", "--shots", "1", "--queries", "2", "--epochs", "1",
              "--episodes-per-epoch", "4", "--tasks-per-batch", "2", "--val-episodes", "5",
              "--head-option", "sc=false", "--out", "runs/tiny")
    assert "caches/synthetic.zarr (the most recently written one, synthetic)" in out
    assert "preload auto -> ram" in out
    out = run("evaluate", "--episodes", "20")
    assert "runs/tiny/best.pt (best.pt of the most recent run)" in out
    line = re.search(r"5-way 1-shot test: (\d+\.\d\d) \+- (\d+\.\d\d) \(20 episodes\)", out)
    assert line, out
    report = json.loads((tmp_path / "runs/tiny/eval-best-test-5way-1shot-20ep-seed0.json")
                        .read_text())
    assert f"{report['accuracy']:.2f}" == line.group(1)
    assert report["checkpoint_config"]["run"]["train"]["queries"] == 2
    # the training-free baseline on exactly the same tasks
    out_a = run("evaluate", "--head", "protonet", "--shots", "1", "--episodes", "20",
                "--save-episodes", "eps.json", "--report", "a.json")
    out_b = run("evaluate", "--head", "otam", "--episodes-from", "eps.json", "--report", "b.json")
    assert "5-way 1-shot test" in out_a and "5-way 1-shot test" in out_b
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert [e for e in a["confusion"]["matrix"]] != [] and b["episodes"] == 20
    assert np.array(a["confusion"]["matrix"]).sum() == np.array(b["confusion"]["matrix"]).sum()
    result = runner.invoke(cli, ["evaluate", "--head", "protonet", "--cache", "missing.zarr"])
    assert result.exit_code == 1 and "no cache at missing.zarr" in result.output


# ------------------------------------------------------------------------------ precompute
@pytest.mark.parametrize("shot", [1, 3])
@pytest.mark.slow
def test_precomputed_evaluation_predicts_what_the_maps_path_predicts(synth, monkeypatch, shot):
    """TA2N's per-video states + batched scoring give the predictions of today's per-episode
    path on the same episodes, whether the states fit (one block) or not (several blocks,
    shared videos recomputed); the log says which."""
    from align import evaluate as ev
    from align.episodes import EpisodeSampler
    from align.feed import Feeder

    head = build_head("ta2n", channels=8, frames=8, height=4, width=4, shot=shot, seed=3)
    with torch.no_grad():
        head.ttm.locnet[-2].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        head.sc.mvnet[-2].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    maps_path = build_head("ta2n", channels=8, frames=8, height=4, width=4, shot=shot)
    maps_path.load_state_dict(head.state_dict())
    maps_path.set_path("maps")
    with FeatureCache.open(synth) as cache:
        episodes = EpisodeSampler(cache, "test", way=4, shot=shot, queries=2, seed=0,
                                  stream=2).episodes(0, 12)
        feeder = Feeder(cache, "test", device=CPU, preload="ram", progress=False)
        common = dict(device=CPU, batch_episodes=5, progress=False)
        expected = ev.run_episodes(maps_path, feeder, episodes, **common)
        said, timing = [], {}
        whole = ev.run_episodes(head, feeder, episodes, log=said.append, timing=timing, **common)
        assert "computed once, kept on cpu in float32" in said[0]
        assert timing["precompute_s"] > 0 and timing["score_s"] > 0
        monkeypatch.setattr(ev, "STATE_SHARE", 1e-12)  # nothing fits: one video per block
        blocks = ev.run_episodes(head, feeder, episodes, log=said.append, **common)
        assert re.search(r"12 blocks of <= 1 videos", said[1]), said[1]
    assert expected.shape == (12, 8)
    np.testing.assert_array_equal(whole, expected)
    np.testing.assert_array_equal(blocks, expected)


def test_report_records_the_precompute_time(synth, tmp_path):
    head = build_head("protonet", channels=8, frames=8, height=4, width=4)
    with FeatureCache.open(synth) as cache:
        out = evaluate(head, cache, EvalConfig(episodes=10, shot=2, batch_episodes=4),
                       device=CPU, report=str(tmp_path / "r.json"), progress=False)
    assert out["precompute_s"] >= 0 and out["episodes_per_s"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["precompute_s"] == out["precompute_s"]


def test_gathered_states_reuse_their_buffers_and_equal_direct_indexing():
    """Scoring gathers each chunk's states into buffers kept across chunks (fresh ones are
    slow to fault in): chunks of any size, smaller or larger than the last, get exactly the
    rows they name, and a larger chunk grows the buffer."""
    from align.evaluate import _gather

    gen = torch.Generator().manual_seed(0)
    states = {"maps": torch.randn(9, 2, 3, 4, generator=gen),
              "mean": torch.randn(9, 3, 2, generator=gen)}
    rows = np.array([2, 3, 5, 7, 8, 10, 11, 13, 14])  # the cache rows the states hold
    position = np.full(15, -1)
    position[rows] = np.arange(len(rows))
    buffers: dict = {}
    for episodes in ([[2, 5], [14, 2], [8, 8]], [[13, 3]], [[7, 10], [11, 2], [3, 5], [8, 14]]):
        got = _gather(states, position, [np.array(e) for e in episodes], buffers, "s")
        index = torch.from_numpy(position[np.array(episodes)])
        for name, state in states.items():
            assert torch.equal(got[name], state[index]), name
    assert buffers[("s", "maps")].shape == (8, 2, 3, 4)
