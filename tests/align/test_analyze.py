"""`analyze`: misalignment measures, embedding before / after alignment, report comparison."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from align.models import build_head
from align.reports import compare as cmp
from align.reports import embedding as emb
from align.reports import misalignment as mis
from cache import FeatureCache, UserError
from cache.synthetic import SynthConfig, generate_synthetic
from cli import cli

CPU = torch.device("cpu")
# Six classes, each a permutation of the same 3 patterns (length 0: single frames say nothing
# about the class, only the order does), clean enough for a linear classifier to name the class
# once it has seen the order; the windows vary per video (at least half of T = 8: starts 0..4).
CLEAN = dict(channels=16, frames=8, size=5, patterns=3, length=0, train_classes=3, val_classes=1,
             test_classes=2, videos_per_class=30, min_duration=0.5, evolution=1.0,
             blob_sigma=1.0, noise=0.3, background=0.3)


@pytest.fixture(scope="module")
def synth_cache(tmp_path_factory):
    """(path, windows) of a small synthetic cache (generate_synthetic remembers it under cwd)."""
    tmp = tmp_path_factory.mktemp("synth")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        generate_synthetic(str(tmp / "clean.zarr"), SynthConfig(**CLEAN, seed=0), progress=False)
    with FeatureCache.open(tmp / "clean.zarr") as cache:
        windows = np.asarray(cache.attrs["synthetic"]["windows"])
    return str(tmp / "clean.zarr"), windows


@pytest.fixture(scope="module")
def online_run(synth_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("misalignment")
    cfg = mis.MisalignmentConfig(readout="online")
    summary = mis.run_misalignment(synth_cache[0], str(out), cfg, CPU)
    return summary, out


def _is_png(path) -> bool:
    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG"


# ------------------------------------------------------------------------------ misalignment
def test_start_times_are_the_first_crossing_and_never_is_minus_one():
    p = np.array([[0.1, 0.6, 0.4, 0.9],  # crosses at 1 (the later dip does not matter)
                  [0.5, 0.2, 0.2, 0.2],  # >= 0.5 counts: starts at 0
                  [0.2, 0.3, 0.49, 0.1]])  # never reaches 0.5
    assert mis.start_times(p).tolist() == [1, 0, -1]


def test_aem_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(7, 5))
    unit = p / np.linalg.norm(p, axis=1, keepdims=True)
    pairs = [1 - unit[i] @ unit[j] for i in range(7) for j in range(7) if i != j]
    assert mis.aem_score(p) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert mis.aem_score(np.tile(p[:1], (4, 1))) == pytest.approx(0.0, abs=1e-12)
    assert mis.aem_score(np.eye(3)) == pytest.approx(1.0)  # disjoint supports: cos = 0


def test_heldout_folds_never_let_a_video_score_itself():
    # Random features with random labels can be memorised but not predicted: the classifier
    # fits them perfectly in-sample, yet every held-out score stays near chance (1/3).
    rng = np.random.default_rng(1)
    frames = rng.standard_normal((60, 2, 128)).astype(np.float32)
    labels = rng.permutation(np.repeat(np.arange(3), 20))
    cfg = mis.MisalignmentConfig(folds=5)
    x = torch.from_numpy(frames)
    x = (x - x.mean((0, 1))) / x.std((0, 1))
    weight, bias = mis.fit_softmax(x, torch.from_numpy(labels), 3, cfg)
    in_sample = mis.frame_logits(x, weight, bias).argmax(-1).numpy()  # (n, T)
    assert (in_sample == labels[:, None]).mean() > 0.95
    probs = mis.heldout_frame_probabilities(frames, labels, 3, cfg, CPU)
    assert (probs.argmax(-1) == labels[:, None]).mean() < 0.5
    fold = mis.video_folds(labels, 5, seed=0)
    for c in range(3):  # stratified: every fold holds 4 of each class's 20 videos
        assert np.bincount(fold[labels == c], minlength=5).tolist() == [4] * 5


@pytest.mark.slow
def test_misalignment_writes_files_with_valid_values(online_run, synth_cache):
    summary, out = online_run
    _, windows = synth_cache
    saved = json.loads((out / "misalignment.json").read_text())
    assert saved["aem"] == pytest.approx(summary["aem"]) and 0 <= saved["aem"] <= 2
    st = saved["start_time"]
    assert len(st["histogram"]) == saved["frames"] == 8
    assert sum(st["histogram"]) + st["never_reached"] == saved["videos"] == len(windows)
    assert 0 <= st["mean"] <= 7
    assert 0 <= saved["classifier"]["heldout_frame_accuracy"] <= 100  # percent
    assert "not the paper's TSM" in saved["note"]
    assert _is_png(out / "misalignment_start_times.png")
    rows = list(csv.DictReader(open(out / "misalignment_videos.csv")))
    assert len(rows) == len(windows)
    starts = np.array([int(r["start"]) for r in rows])
    assert ((starts >= -1) & (starts <= 7)).all()
    probs = np.array([[float(r[f"p{t}"]) for t in range(8)] for r in rows])
    assert ((probs >= 0) & (probs <= 1)).all()


@pytest.mark.slow
def test_measured_start_times_follow_the_generated_windows(online_run, synth_cache):
    _, out = online_run
    _, windows = synth_cache
    rows = list(csv.DictReader(open(out / "misalignment_videos.csv")))  # cache row order
    measured = np.array([int(r["start"]) for r in rows])
    generated = windows[:, 0]
    seen = measured >= 0
    assert seen.mean() > 0.6  # most videos are recognised at some frame
    assert np.corrcoef(generated[seen], measured[seen])[0, 1] > 0.25
    early = measured[seen & (generated == 0)].mean()
    late = measured[seen & (generated >= 2)].mean()
    assert late > early + 1.0  # windows starting 2+ frames later are recognised later


@pytest.mark.slow
def test_frame_readout_finds_where_a_class_appearance_starts(tmp_path):
    # Appearance-defined classes (as in UCF101): each class adds its own channel pattern from a
    # per-video start frame on; single frames then identify the class, and the default per-frame
    # readout measures each video's start.
    rng = np.random.default_rng(0)
    classes, per_class, (c, t, s) = 4, 12, (16, 8, 4)
    patterns = 2.0 * rng.standard_normal((classes, c))
    labels = np.repeat(np.arange(classes), per_class)
    starts = rng.integers(0, t - 2, size=len(labels))
    cache = FeatureCache.create(tmp_path / "appearance.zarr", video_ids=[f"v{i}" for i in
                                range(len(labels))], splits=["test"] * len(labels),
                                labels=labels, classes=[f"c{k}" for k in range(classes)],
                                shape=(c, t, s, s))
    with cache:
        for row, (label, start) in enumerate(zip(labels, starts)):
            maps = 0.5 * rng.standard_normal((c, t, s, s))
            maps[:, start:] += patterns[label][:, None, None, None]
            cache.write_row(row, maps)
    summary = mis.run_misalignment(str(tmp_path / "appearance.zarr"), str(tmp_path / "out"),
                                 mis.MisalignmentConfig(), CPU)
    rows = list(csv.DictReader(open(tmp_path / "out" / "misalignment_videos.csv")))
    measured = np.array([int(r["start"]) for r in rows])
    assert summary["start_time"]["never_reached"] == 0
    assert (measured == starts).mean() > 0.9


@pytest.mark.slow
def test_misalignment_cli_prints_the_caveat_and_the_frame_readout_warning(synth_cache, tmp_path):
    # Single frames of the synthetic cache show patterns every class shares: the per-frame
    # readout is at chance, and the command says so and what to do.
    result = CliRunner().invoke(cli, ["analyze", "misalignment", synth_cache[0], "--out",
                                      str(tmp_path), "--split", "train", "--folds", "3",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "not the paper's TSM" in result.output
    assert "try --readout online" in result.output
    assert "most videos never reach the threshold" in result.output
    assert json.loads((tmp_path / "misalignment.json").read_text())["classes"] == 3


def test_misalignment_refuses_bad_input(synth_cache, tmp_path):
    with pytest.raises(UserError, match="folds"):
        mis.run_misalignment(synth_cache[0], str(tmp_path), mis.MisalignmentConfig(folds=1), CPU)
    with pytest.raises(UserError, match="no cache"):
        mis.run_misalignment(str(tmp_path / "missing.zarr"), str(tmp_path),
                           mis.MisalignmentConfig(), CPU)


# ------------------------------------------------------------------------------ embedding
def _embed(cache_path, head, tmp_path, **cfg):
    cfg = emb.EmbeddingConfig(**{"way": 2, "shot": 1, "queries": 3, "episodes": 3, **cfg})
    with FeatureCache.open(cache_path) as cache:
        return emb.run_embedding(cache, head, str(tmp_path), cfg, CPU, "test head", progress=False)


@pytest.mark.slow
def test_embedding_with_protonet_changes_nothing(synth_cache, tmp_path):
    head = build_head("protonet", channels=16, frames=8, height=5, width=5)
    summary = _embed(synth_cache[0], head, tmp_path)
    assert summary["ratio_after"] == pytest.approx(summary["ratio_before"], rel=1e-5)
    assert summary["before"]["accuracy"] == summary["after"]["accuracy"]


@pytest.mark.slow
def test_embedding_with_a_ta2n_head_writes_the_figure_and_finite_ratios(synth_cache, tmp_path):
    head = build_head("ta2n", channels=16, frames=8, height=5, width=5, shot=2, seed=0)
    summary = _embed(synth_cache[0], head, tmp_path, shot=2)
    saved = json.loads((tmp_path / "embedding.json").read_text())
    for stage in ("before", "after"):
        assert np.isfinite(saved[stage]["ratio"]) and saved[stage]["ratio"] > 0
        assert 0 <= saved[stage]["accuracy"] <= 100
    assert saved["ratio_after"] == pytest.approx(summary["ratio_after"])
    assert _is_png(tmp_path / "embedding_tsne.png")


def test_embedding_uses_the_heads_own_distances(synth_cache):
    head = build_head("ta2n", channels=16, frames=8, height=5, width=5, seed=0).eval()
    with FeatureCache.open(synth_cache[0]) as cache:
        maps = torch.from_numpy(cache.read_rows(cache.rows("test")[[0, 1, 30, 31]])).float()
    support, query = maps[[0, 2]], maps[[1, 3]]  # 2-way 1-shot, one query per class
    part = emb.embed_episode(head, support, query, way=2, shot=1)
    with torch.no_grad():
        logits = head(support, query, 2, 1)  # (M, way)
    assert np.allclose(part["after"]["distances"], -logits.T.numpy(), atol=1e-5)
    assert part["before"]["queries"].shape == (2, 8 * 16)
    assert part["after"]["prototypes"].shape == (2, 8 * 16)


def test_embedding_refuses_a_head_without_pair_features(synth_cache):
    otam = build_head("otam", channels=16, frames=8, height=5, width=5)
    maps = torch.zeros(4, 16, 8, 5, 5)
    with pytest.raises(UserError, match="no aligned pair features"):
        emb.embed_episode(otam, maps[:2], maps[2:], way=2, shot=1)


@pytest.mark.slow
def test_embedding_cli_with_an_untrained_protonet(synth_cache, tmp_path):
    result = CliRunner().invoke(cli, ["analyze", "embedding", synth_cache[0], "--head",
                                      "protonet", "--episodes", "2", "--way", "2", "--queries",
                                      "2", "--shots", "1", "--out", str(tmp_path), "--device",
                                      "cpu"])
    assert result.exit_code == 0, result.output
    assert "before" in result.output and "after" in result.output
    assert _is_png(tmp_path / "embedding_tsne.png")


# ------------------------------------------------------------------------------ compare
def _report(path, per_class, episode_accuracy, **episodes):
    payload = {"accuracy": float(np.mean(episode_accuracy)), "ci95": 1.0,
               "episodes": len(episode_accuracy), "split": "test", "way": 2, "shot": 1,
               "queries": 1, "seed": 0, "episodes_from": None,
               "head": {"kind": "protonet"}, "cache": {"path": "caches/x.zarr"},
               "per_class_accuracy": per_class, "episode_accuracy": episode_accuracy}
    payload.update(episodes)
    path.write_text(json.dumps(payload))
    return str(path)


def test_compare_sorts_the_known_gains(tmp_path):
    a = _report(tmp_path / "a.json", {"jump": 50.0, "run": 80.0, "swim": 40.0, "walk": 90.0},
                [50.0, 100.0, 50.0, 100.0])
    b = _report(tmp_path / "b.json", {"jump": 75.0, "run": 70.0, "swim": 100.0, "walk": 90.0},
                [100.0, 100.0, 50.0, 100.0], head={"kind": "ta2n", "tc": True})
    summary = cmp.run_compare(a, b, str(tmp_path / "out"), top=2)
    assert [(g["class"], g["gain"]) for g in summary["classes"]] == [
        ("swim", 60.0), ("jump", 25.0), ("walk", 0.0), ("run", -10.0)]
    assert summary["top_gains"] == ["swim", "jump"]
    assert summary["paired_episode_gain"]["gain"] == pytest.approx(12.5)
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["classes"] == summary["classes"]
    assert all(0 <= g[k] <= 100 for g in saved["classes"] for k in ("a", "b"))
    assert _is_png(tmp_path / "out" / "compare_gains.png")
    text = cmp.format_compare(summary)
    assert "most gain  swim, jump" in text


def test_compare_refuses_reports_on_different_episodes(tmp_path):
    a = _report(tmp_path / "a.json", {"jump": 50.0}, [50.0])
    b = _report(tmp_path / "b.json", {"jump": 75.0}, [75.0], seed=1)
    with pytest.raises(UserError, match="seed 0 vs 1"):
        cmp.run_compare(a, b, str(tmp_path / "out"))
    summary = cmp.run_compare(a, b, str(tmp_path / "out"), allow_different=True)
    assert not summary["same_episodes"] and summary["paired_episode_gain"] is None
    assert "NOT the same episodes" in cmp.format_compare(summary)


def test_compare_cli(tmp_path):
    a = _report(tmp_path / "a.json", {"jump": 50.0, "run": 80.0}, [65.0])
    b = _report(tmp_path / "b.json", {"jump": 75.0, "run": 70.0}, [72.5])
    result = CliRunner().invoke(cli, ["analyze", "compare", a, b, "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "jump" in result.output.splitlines()[-2]
    not_a_report = tmp_path / "x.json"
    not_a_report.write_text("{}")
    result = CliRunner().invoke(cli, ["analyze", "compare", a, str(not_a_report)])
    assert result.exit_code == 1 and "not an evaluation report" in result.output
