"""`visualize`: the geometry of the TTM window and SC boxes, pair figures and training curves as
PNGs of the promised size, re-decoded frames that follow the cache's sampling rule, the
feature-energy fallback, and the demo report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from align.checkpoints import save_head
from align.episodes import EpisodeSampler, Stream
from align.models import build_head
from align.models.acm import axis_weights
from align.reports.curves import CURVES_SIZE, plot_training_curves
from align.reports.pairs import (
    FrameSource,
    draw_pair,
    mask_span,
    pair_figure_size,
    png_size,
    ttm_window,
)
from cache import FeatureCache
from cache.synthetic import SynthConfig, generate_synthetic
from cli import cli
from demo import write_report
from extract.sampling import centre_indices
from extract.toydata import ToyConfig, make_toy_dataset, render_video

TOY = dict(train_classes=3, val_classes=3, test_classes=3, videos_per_class=3, frames=12,
           size=64)


# ------------------------------------------------------------------------------ geometry
def test_ttm_window_spans_what_the_warp_reads():
    assert ttm_window((1.0, 0.0), 8) == pytest.approx((0.0, 7.0))
    # s = 0.5 u + 0.5 reads s in [0, 1]: the second half of the frames
    assert ttm_window((0.5, 0.5), 8) == pytest.approx((3.5, 7.0))
    assert ttm_window((-0.5, 0.5), 8) == pytest.approx((3.5, 7.0))  # reversed, same span
    # s in [-0.3, 1.5] is clipped to [-0.3, 1]: from frame 1.4 to the last frame
    assert ttm_window((0.9, 0.6), 5) == pytest.approx((1.4, 4.0))


@pytest.mark.parametrize("cells", [4, 7])
@pytest.mark.parametrize("offset", [0.0, 0.3, -0.45, 0.75])
def test_sc_box_holds_exactly_the_cells_the_mask_weights_most(cells, offset):
    """The box edges are the mask's half-weight edges: cells weighted >= 1/2 by the heads'
    own mask lie inside, the others outside (cell centres in pixels of a 112 px frame)."""
    pixels = 112
    lo, hi = mask_span(offset, cells, pixels)
    weights = axis_weights(torch.tensor(offset, dtype=torch.float64), cells).numpy()
    centres = (np.arange(cells) + 0.5) * pixels / cells
    inside = (centres > lo) & (centres < hi)
    assert np.array_equal(inside, weights >= 0.5), (lo, hi, weights)
    if offset == 0:
        assert (lo, hi) == (0.0, pixels)


def test_sc_box_moves_opposite_ways_for_support_and_query():
    s_lo, s_hi = mask_span(0.5, 7, 112)
    q_lo, q_hi = mask_span(-0.5, 7, 112)
    assert s_lo == 0 and s_hi < 112  # support keeps the part shifted by +o: its left side
    assert q_lo > 0 and q_hi == 112  # query keeps the part shifted by -o: its right side


# ------------------------------------------------------------------------------ drawings
@pytest.mark.parametrize("frames", [4, 8])
def test_pair_figure_is_a_png_of_the_promised_size(tmp_path, frames):
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 255, (frames, 40, 40, 3), dtype=np.uint8)
    full = draw_pair(tmp_path / "pair.png", support_frames=clip, query_frames=clip[::-1],
                     support_theta=(0.6, -0.2), query_theta=(-0.9, 0.1),
                     offsets=rng.uniform(-0.75, 0.75, (frames, 2)),
                     attention=rng.dirichlet(np.ones(frames), frames), map_hw=(4, 4),
                     title="a title\nsecond line")
    bare = draw_pair(tmp_path / "bare.png", support_frames=clip, query_frames=clip)
    assert png_size(full) == png_size(bare) == pair_figure_size(frames)


def test_png_size_refuses_other_files(tmp_path):
    (tmp_path / "x.png").write_bytes(b"GIF89a" + bytes(30))
    with pytest.raises(ValueError):
        png_size(tmp_path / "x.png")


def write_metrics(path: Path) -> None:
    fields = ["epoch", "lr", "train_loss", "train_acc", "val_acc", "val_ci95", "best_val_acc",
              "epoch_time_s", "episodes_per_s"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for epoch in range(1, 5):  # validation every other epoch: empty cells in between
            val = 40 + 5 * epoch if epoch % 2 == 0 else None
            writer.writerow({"epoch": epoch, "lr": 0.01, "train_loss": 8 - epoch,
                             "train_acc": 30 + 10 * epoch, "val_acc": val,
                             "val_ci95": 3.0 if val else None, "best_val_acc": val,
                             "epoch_time_s": 1.0, "episodes_per_s": 2.0})


def test_training_curves_png(tmp_path):
    write_metrics(tmp_path / "metrics.csv")
    path = plot_training_curves(tmp_path / "metrics.csv", tmp_path / "curves.png", chance=20)
    assert png_size(path) == CURVES_SIZE


# ------------------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Toy videos -> extract (resnet18, random weights, 4 x 4 maps) -> a short train-heads run.
    Commands run in a temporary folder: runs/ and caches/ records stay out of the repo."""
    base = tmp_path_factory.mktemp("vis")
    toy = make_toy_dataset(base / "toy", ToyConfig(**TOY), progress=False)
    cache = str(base / "toy.zarr")
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        result = runner.invoke(cli, [
            "extract", "--dataset", "custom", "--root", toy.root, "--split-dir", toy.split_dir,
            "--out", cache, "--backbone", "resnet18", "--weights", "none", "--frames", "4",
            "--image-size", "128", "--resize", "128", "--workers", "0", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        result = runner.invoke(cli, [
            "train-heads", "--cache", cache, "--way", "3", "--shots", "1", "--queries", "1",
            "--epochs", "2", "--episodes-per-epoch", "2", "--tasks-per-batch", "1",
            "--val-every", "1", "--val-episodes", "2", "--device", "cpu",
            "--out", str(base / "run")])
        assert result.exit_code == 0, result.output
    return {"base": base, "toy": toy, "cache": cache, "checkpoint": base / "run" / "best.pt"}


@pytest.mark.slow
def test_visualize_draws_every_pair_and_the_curves(trained, tmp_path):
    out = tmp_path / "figs"
    result = CliRunner().invoke(cli, [
        "visualize", "--checkpoint", str(trained["checkpoint"]), "--way", "3",
        "--episodes", "2", "--pairs", "all", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "re-decoded from" in result.output
    index = json.loads((out / "index.json").read_text())
    assert len(index["figures"]) == 2 * 3 * 3  # 2 episodes x 3 queries x 3 prototypes
    for record in index["figures"]:
        assert png_size(record["path"]) == pair_figure_size(4)
        assert record["query"].split("/")[0] == record["query_class"]
    assert sum(r["same_class"] for r in index["figures"]) == 2 * 3
    assert png_size(out / "training_curves.png") == CURVES_SIZE


@pytest.mark.slow
def test_visualize_true_pairs_of_saved_episodes(trained, tmp_path):
    episodes = tmp_path / "episodes.json"
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(trained["base"])
        result = runner.invoke(cli, ["evaluate", "--checkpoint", str(trained["checkpoint"]),
                                     "--way", "3", "--episodes", "3", "--device", "cpu",
                                     "--save-episodes", str(episodes)])
        assert result.exit_code == 0, result.output
    saved = json.loads(episodes.read_text())["episodes"]
    result = runner.invoke(cli, [
        "visualize", "--checkpoint", str(trained["checkpoint"]), "--episodes-from",
        str(episodes), "--episodes", "3", "--pairs", "true", "--out", str(tmp_path / "figs")])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "figs" / "index.json").read_text())
    assert [r["query"] for r in index["figures"]] == [q for e in saved for q in e["query"]]
    assert all(r["same_class"] for r in index["figures"])


@pytest.mark.slow
def test_frames_follow_the_cache_sampling_rule(trained):
    """Re-decoded frame t is the video's frame floor((t + 0.5) n / T), not its neighbour."""
    truth = json.loads((Path(trained["toy"].out) / "toydata.json").read_text())
    cfg = ToyConfig(**truth["config"])
    with FeatureCache.open(trained["cache"]) as cache:
        frames_of = FrameSource(cache)
        row = int(cache.rows("test")[0])
        video_id = str(cache.video_ids[row])
        shown = frames_of(row).astype(float)  # (T, S, S, 3)
    assert shown.shape == (4, 128, 128, 3)
    rendered = render_video(truth["videos"][video_id], cfg)  # (12, 64, 64, 3), before encoding
    upscaled = rendered.repeat(2, axis=1).repeat(2, axis=2).astype(float)  # 64 -> 128
    for t, index in enumerate(centre_indices(cfg.frames, 4)):
        errors = [np.abs(shown[t] - upscaled[i]).mean() for i in range(cfg.frames)]
        assert errors[index] < 4
        assert errors[index] == min(errors)


@pytest.mark.slow
def test_each_figure_says_where_its_frames_came_from(trained, tmp_path):
    """A video missing under --root gets feature-energy frames, and index.json says so for that
    figure alone; the others stay re-decoded."""
    root = tmp_path / "videos"
    shutil.copytree(trained["toy"].root, root)
    with FeatureCache.open(trained["cache"]) as cache:
        first = EpisodeSampler(cache, "test", way=3, shot=1, queries=1, seed=0,
                               stream=Stream.TEST).episode(0)
        gone = str(cache.video_ids[int(first.query[0])])
    for path in (root / gone.split("/")[0]).glob(gone.split("/")[1] + ".*"):
        path.unlink()
    out = tmp_path / "figs"
    result = CliRunner().invoke(cli, [
        "visualize", "--checkpoint", str(trained["checkpoint"]), "--way", "3", "--pairs", "true",
        "--root", str(root), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    figures = json.loads((out / "index.json").read_text())["figures"]
    sources = {r["query"]: r["frames"]["query"] for r in figures}
    assert sources[gone].startswith("feature energy (") and "is not under" in sources[gone]
    assert all(v == "video" for k, v in sources.items() if k != gone)
    assert all(r["frames"]["support"] == "video" for r in figures)


@pytest.mark.slow
def test_energy_frames_without_videos_and_multi_shot(tmp_path, monkeypatch):
    """A cache with no videos behind it (synth) still gets figures, of feature energy; a 2-shot
    prototype shows its first shot."""
    monkeypatch.chdir(tmp_path)  # synth records caches/latest.json in the working folder
    cache = str(tmp_path / "syn.zarr")
    generate_synthetic(cache, SynthConfig(channels=8, frames=4, size=4, train_classes=3,
                                          val_classes=3, test_classes=3, videos_per_class=3),
                       progress=False)
    run = tmp_path / "run"
    run.mkdir()
    save_head(build_head("ta2n", channels=8, frames=4, height=4, width=4, shot=2),
              run / "best.pt")
    (run / "config.json").write_text(json.dumps({"train": {"cache": cache, "shot": 2,
                                                           "way": 3}}))
    result = CliRunner().invoke(cli, ["visualize", "--checkpoint", str(run / "best.pt"),
                                      "--way", "3", "--pairs", "true"])
    assert result.exit_code == 0, result.output
    assert "feature energy" in result.output
    index = json.loads((run / "figures" / "index.json").read_text())
    assert len(index["figures"]) == 3
    assert png_size(index["figures"][0]["path"]) == pair_figure_size(4)
    assert all(r["support"].split("/")[0] == r["query_class"] for r in index["figures"])
    assert "no metrics.csv" in result.output


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(cli, ["visualize", "--checkpoint", str(tmp_path / "no.pt")])
    assert result.exit_code == 1 and "no checkpoint at" in result.output


def test_report_links_resolve(tmp_path):
    figure = draw_pair(tmp_path / "figs" / "ep00_q00_p0.png",
                       support_frames=np.zeros((4, 8, 8, 3), np.uint8),
                       query_frames=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "eval-ta2n.json").write_text("{}")
    report = write_report(
        tmp_path / "report.md", title="demo", intro=["intro"],
        results=[{"head": "ta2n", "accuracy": 61.234, "ci95": 2.5, "episodes": 100,
                  "report": str(tmp_path / "eval-ta2n.json")}],
        phases=[{"name": "extract", "seconds": 12.0, "cpu_seconds": 150.0,
                 "command": "python cli.py extract"}],
        figures={"curves": None, "pairs": [{
            "episode": 0, "query": "a/a_v00", "support": "a/a_v01", "query_class": "a",
            "support_class": "a", "same_class": True, "predicted": "a", "correct": True,
            "distance": 1.5, "path": str(figure)}]})
    text = report.read_text()
    assert "| ta2n | 61.23 | +- 2.50 | 100 |" in text
    assert "| extract | 12 s | 2.5 min | `python cli.py extract` |" in text
    links = [part.split(")")[0] for part in text.split("](")[1:]]
    assert links and all((tmp_path / link).exists() for link in links)
