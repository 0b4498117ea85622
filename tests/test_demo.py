"""`make demo` end to end with tiny settings: every phase runs as the command a user types, the
summary holds both heads on the same episodes, and the report's links resolve. Plus the choice
of backbone weights (ImageNet only when torchvision's cache already has them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.reports.pairs import pair_figure_size, png_size
from demo import DemoConfig, cached_imagenet_weights, choose_weights, format_demo, run_demo

TINY = dict(weights="none", backbone="resnet18", frames=4, image_size=128, resize=128,
            extract_workers=0,
            train_classes=3, val_classes=3, test_classes=3, videos_per_class=3, video_frames=12,
            video_size=64, way=3, shots=1, train_queries=1, epochs=2, episodes_per_epoch=2,
            tasks_per_batch=1, lr_step=1, val_every=1, val_episodes=2, eval_episodes=6,
            vis_episodes=1, vis_pairs="true", device="cpu")


@pytest.mark.slow
def test_demo_runs_the_pipeline_end_to_end(tmp_path):
    summary = run_demo(DemoConfig(workdir=str(tmp_path), **TINY), echo=lambda m: None,
                       quiet=True)
    assert [p["name"] for p in summary["phases"]] == [
        "toy-data", "extract", "train-heads", "evaluate ta2n", "evaluate protonet", "visualize"]
    assert all(p["command"].startswith("python cli.py ") for p in summary["phases"])
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
    assert "near chance" in table  # random weights are said out loud


def test_imagenet_weights_only_when_already_cached(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert cached_imagenet_weights("resnet50") is None
    weights, notice = choose_weights(DemoConfig())
    assert weights == "none" and "NOTICE" in notice and "RANDOMLY" in notice
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / "resnet50-0676ba61.pth").write_bytes(b"cached")
    assert choose_weights(DemoConfig()) == ("imagenet", None)
    assert choose_weights(DemoConfig(weights="none")) == ("none", None)
