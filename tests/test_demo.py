"""`make demo` end to end with tiny settings: every phase runs as the command a user types, the
backbone is adapted on the train classes and extract records it, the summary holds both heads on
the same episodes with the margin, and the report's links resolve. Plus the choice of the
weights adaptation starts from (ImageNet only when torchvision's cache already has them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.reports.pairs import pair_figure_size, png_size
from cache import FeatureCache
from cli import run_in_process
from demo import (
    DemoConfig,
    cached_imagenet_weights,
    choose_weights,
    format_demo,
    run_demo,
    run_in_subprocess,
)

TINY = dict(weights="none", backbone="resnet18", frames=4, image_size=128, resize=128,
            adapt_epochs=1, adapt_frames=2, adapt_batch=4, workers=0,
            train_classes=3, val_classes=3, test_classes=3, videos_per_class=3, video_frames=12,
            video_size=64, way=3, shots=1, train_queries=1, epochs=2, episodes_per_epoch=2,
            val_every=1, val_episodes=2, eval_episodes=6, classify_queries=1,
            vis_episodes=1, vis_pairs="true", device="cpu")


@pytest.mark.slow
def test_demo_runs_the_pipeline_end_to_end(tmp_path):
    summary = run_demo(DemoConfig(workdir=str(tmp_path), **TINY), echo=lambda m: None,
                       quiet=True, runner=run_in_process)
    assert [p["name"] for p in summary["phases"]] == [
        "toy-data", "adapt-backbone", "extract", "train-heads", "evaluate ta2n",
        "evaluate protonet", "visualize", "classify ta2n", "classify protonet"]
    assert all(p["command"].startswith("python cli.py ") for p in summary["phases"])
    assert all(p["cpu_seconds"] > 0 for p in summary["phases"])
    # the backbone was adapted on the 3 train classes, and extract used that very file
    backbone = summary["backbone"]
    assert backbone["start"] == "random weights" and backbone["base_classes"] == 3
    with FeatureCache.open(tmp_path / "caches/demo.zarr") as cache:
        assert cache.attrs["weights"]["sha256"] == backbone["sha256"]
        assert cache.attrs["weights"]["provenance"]["base_classes"] == \
            json.loads((tmp_path / "runs/demo/backbone.pt.json").read_text())["base_classes"]
    # everything lands under data/demo, caches/ and runs/demo of the working folder
    assert (tmp_path / "data/demo/videos").is_dir() and (tmp_path / "caches/demo.zarr").exists()
    run = tmp_path / "runs/demo"
    # both heads on exactly the same saved test episodes
    ta2n, proto = (json.loads((run / f"eval-{h}.json").read_text()) for h in ("ta2n", "protonet"))
    assert ta2n["episodes"] == proto["episodes"] == 6
    assert proto["episodes_from"] == "runs/demo/test-episodes.json"
    assert [r["head"] for r in summary["results"]] == ["ta2n", "protonet"]
    assert summary["results"][0]["accuracy"] == ta2n["accuracy"]
    # figures: one per test query (pairs "true"), and the training curves
    figures = summary["figures"]["figures"]
    assert len(figures) == 3 and png_size(figures[0]["path"]) == pair_figure_size(4)
    assert Path(summary["figures"]["curves"]).exists()
    # the report and its links
    report = Path(summary["report"])
    text = report.read_text()
    links = [part.split(")")[0] for part in text.split("](")[1:]]
    assert len(links) >= 5 and all((report.parent / link).exists() for link in links)
    table = format_demo(summary)
    assert "ta2n" in table and "protonet" in table and str(report) in table
    assert "resnet18 adapted from random weights on the 3 train (base) classes" in table
    lead = summary["margin"]
    assert lead["points"] == round(ta2n["accuracy"] - proto["accuracy"], 2)
    assert f"ta2n - protonet: {lead['points']:+.2f} points" in table
    assert lead["both_above_chance"] == (min(ta2n["accuracy"] - ta2n["ci95"], proto["accuracy"]
                                             - proto["ci95"]) > 100 / 3)
    assert ("both above it" if lead["both_above_chance"] else "not both above it") in table
    assert "adapted from random weights" in text
    # classify: the clips of the test classes not in the support set, both heads on them
    own = summary["classify"]
    assert own["ta2n"]["queries"] == own["protonet"]["queries"] == 3
    support = sorted(p.name for p in (run / "my-clips/support").glob("*/*"))
    query = sorted(p.name for p in (run / "my-clips/query").glob("*/*"))
    assert len(support) == len(query) == 3 and not set(support) & set(query)
    rows = (run / "predictions.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("query,predicted,probability")
    assert len(own["ta2n"]["figures"]) == 3
    assert "## Your own clips: `classify`" in text
    assert f"ta2n {own['ta2n']['accuracy']:.1f} %, protonet" in table


def test_imagenet_weights_only_when_already_cached(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert cached_imagenet_weights("resnet18") is None
    weights, notice = choose_weights(DemoConfig())
    assert weights == "none" and "NOTICE" in notice and "RANDOM weights" in notice
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"cached")
    assert choose_weights(DemoConfig()) == ("imagenet", None)
    assert choose_weights(DemoConfig(weights="none")) == ("none", None)



def run_toy(runner, workdir, name: str, videos: int) -> tuple[int, str]:
    return runner(["toy-data", "--out", name, "--train-classes", "1", "--val-classes", "0",
                   "--test-classes", "0", "--videos-per-class", str(videos), "--frames", "2",
                   "--size", "32"], str(workdir), True)


def check_runner(runner, workdir) -> None:
    """A command runs in the working folder and says so; a failing one gives its status and
    one-line message (the same with either runner)."""
    status, output = run_toy(runner, workdir, "toy", 1)
    assert status == 0 and "1 videos of 1 classes" in output
    assert (workdir / "toy" / "toydata.json").exists()
    status, output = run_toy(runner, workdir, "bad", 0)
    assert status == 1 and "videos_per_class >= 1" in output
    assert not (workdir / "bad").exists()


def test_in_process_runner(tmp_path):
    """What `python cli.py demo` runs its phases with."""
    check_runner(run_in_process, tmp_path)


@pytest.mark.slow
def test_subprocess_runner(tmp_path):
    """run_demo's default: a process per phase."""
    check_runner(run_in_subprocess, tmp_path)
