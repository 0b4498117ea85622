"""`adapt-backbone` on generated videos: it trains on the train split only and says so, resume
equals an uninterrupted run, the exported file reproduces the classifier's backbone (and its
logits), extract records where the weights came from and refuses leaked classes, bad videos are
skipped, and two DDP processes (gloo, torchrun) match one process."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from extract_testing import build_dataset, decode_all

from cache import FeatureCache, UserError
from cli import cli
from extract.adapt import AdaptConfig
from extract.adapt_data import base_data
from extract.adapt_model import lr_at
from extract.adapt_train import run_adapt
from extract.backbone import file_sha256, sidecar_path
from extract.backbones import Backbone
from extract.pipeline import run_extract
from extract.plan import ExtractConfig, Shard
from extract.sampling import plan_views

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("jump", "run", "sit")
VIDEOS = {f"{c}/v{k}": ("mp4", 10 + 2 * k) for c in CLASSES for k in range(4)}
VIDEOS.update({"swim/v0": ("mp4", 9), "walk/v0": ("mp4", 11)})
SPLITS = {"train": [f"{c}/v{k}" for c in CLASSES for k in range(4)], "val": ["swim/v0"],
          "test": ["walk/v0"]}
ONE = Shard(0, 1, 0)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(root, split_dir): 3 train classes x 4 videos, one val and one test class."""
    base = tmp_path_factory.mktemp("adapt")
    build_dataset(base / "root", base / "splits", VIDEOS, SPLITS)
    return base / "root", base / "splits"


def config(data, out, **changes) -> AdaptConfig:
    root, split_dir = data
    base = dict(dataset="custom", root=str(root), split_dir=str(split_dir), out=str(out),
                backbone="resnet18", weights="none", frames=2, image_size=32, resize=36,
                epochs=2, batch_size=4, micro_batch=2, optimizer="sgd", lr=0.05, momentum=0.9,
                weight_decay=1e-4, warmup=0.5, held_out=0.25, workers=0)
    return AdaptConfig(**{**base, **changes})


def adapt(cfg: AdaptConfig, **kwargs):
    return run_adapt(cfg, CPU, ONE, echo=lambda m: None, **kwargs)


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_trains_on_the_train_split_only_and_records_it(data, tmp_path):
    summary = adapt(config(data, tmp_path / "w.pt"))
    meta = json.loads(Path(sidecar_path(tmp_path / "w.pt")).read_text())
    assert meta["base_classes"] == list(CLASSES) and summary.classes == 3
    assert sorted(meta["videos"] + meta["held_out_videos"]) == sorted(SPLITS["train"])
    assert len(meta["held_out_videos"]) == 3  # one of every class's four
    assert {v.split("/")[0] for v in meta["held_out_videos"]} == set(CLASSES)
    state = load(tmp_path / "w.pt")
    assert state["fc.weight"].shape == (3, 512)  # a classifier over the base classes only
    assert meta["weights_sha256"] == file_sha256(tmp_path / "w.pt") == summary.sha256
    assert meta["epochs"] == 2 and meta["recipe"]["optimizer"] == "sgd"
    history = (tmp_path / "w.run" / "metrics.csv").read_text().splitlines()
    assert len(history) == 3 and history[0].startswith("epoch,lr,loss")


def test_classes_shared_with_val_or_test_are_refused(data, tmp_path):
    root, _ = data
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    for split, lines in {**SPLITS, "val": ["swim/v0", "jump/v3"]}.items():
        (split_dir / f"{split}list.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="jump are in the train list and in the val / test"):
        adapt(config((root, split_dir), tmp_path / "w.pt"))


def test_held_out_slice_is_seeded(data, tmp_path):
    held = {s: {r.video_id for r in base_data(config(data, "w.pt", seed=s)).held_out}
            for s in (0, 0, 1, 2)}
    assert held[0] == {r.video_id for r in base_data(config(data, "w.pt")).held_out}
    assert len({frozenset(v) for v in held.values()}) > 1


@pytest.mark.slow
def test_resume_after_a_stop_equals_an_uninterrupted_run(data, tmp_path):
    straight = config(data, tmp_path / "a.pt", epochs=3, optimizer="adamw", lr=0.01)
    adapt(straight)
    killed = replace(straight, out=str(tmp_path / "b.pt"))
    stopped = adapt(killed, stop_after=1)
    assert stopped.stopped and not (tmp_path / "b.pt").exists()
    with pytest.raises(UserError, match="--resume to continue"):
        adapt(killed)
    with pytest.raises(UserError, match="other settings.*lr"):
        adapt(replace(killed, resume=True, lr=0.02))
    resumed = adapt(replace(killed, resume=True))
    assert resumed.trained_epochs == 2 and [h.epoch for h in resumed.history] == [1, 2, 3]
    a, b = load(tmp_path / "a.run" / "last.pt"), load(tmp_path / "b.run" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    moments = [(x, y) for s in a["optimizer"]["state"]
               for x, y in zip(a["optimizer"]["state"][s].values(),
                               b["optimizer"]["state"][s].values())]
    assert moments and all(torch.equal(x, y) for x, y in moments)
    assert file_sha256(tmp_path / "a.pt") == file_sha256(tmp_path / "b.pt")


@pytest.mark.slow
def test_exported_weights_reproduce_the_classifiers_features(data, tmp_path):
    adapt(config(data, tmp_path / "w.pt"))
    trained = load(tmp_path / "w.run" / "last.pt")["model"]
    # the classifier's backbone, rebuilt from the training checkpoint
    net = torchvision.models.resnet18(num_classes=3)
    net.load_state_dict({k.removeprefix("trunk."): v for k, v in trained.items()})
    net.eval()
    # the exported file through the registry, as extract --weights loads it
    backbone = Backbone.prepare("resnet18", str(tmp_path / "w.pt"), 0, CPU, image_size=32,
                                resize=36, dtype="float32")
    assert backbone.weights.provenance["base_classes"] == list(CLASSES)
    frames = decode_all(str(data[0] / "walk/v0.mp4"))[:4]  # (4, H, W, 3): an unseen class
    crops = torch.from_numpy(frames).permute(0, 3, 1, 2)
    crops = torchvision.transforms.v2.functional.resize(crops, [36, 36], antialias=True)
    crops = crops[..., 2:34, 2:34].contiguous()  # (4, 3, 32, 32) uint8
    maps = backbone.extractor(crops)  # (4, 512, 1, 1)
    x = backbone.extractor.normalize(crops)
    trunk = torch.nn.Sequential(*list(net.children())[:-2])
    with torch.no_grad():
        assert torch.allclose(maps, trunk(x), atol=1e-6)
        # and the file is a complete torchvision model whose fc is the classifier's
        full = torchvision.models.resnet18(num_classes=3)
        full.load_state_dict(load(tmp_path / "w.pt"))
        assert torch.allclose(full.eval()(x), net(x), atol=1e-6)


@pytest.mark.slow
def test_extract_records_the_provenance_and_refuses_leaked_classes(data, tmp_path):
    weights = tmp_path / "w.pt"
    adapt(config(data, weights))
    meta = json.loads(Path(sidecar_path(weights)).read_text())
    root, split_dir = data
    extract = ExtractConfig(dataset="custom", root=str(root), split_dir=str(split_dir),
                            out=str(tmp_path / "c.zarr"), backbone="resnet18",
                            weights=str(weights), frames=2, image_size=32, resize=36, workers=0)
    run_extract(extract, CPU, ONE, echo=lambda m: None)
    with FeatureCache.open(tmp_path / "c.zarr") as cache:
        attrs = cache.attrs
    record = attrs["weights"]["provenance"]
    assert record["base_classes"] == list(CLASSES) and record["epochs"] == 2
    assert record["videos"] == 9 and record["held_out_videos"] == 3
    assert attrs["weights"]["sha256"] == meta["weights_sha256"]
    assert attrs["weights_state_sha256"] == meta["state_sha256"]
    # a split whose test list holds a class the backbone was trained on is refused
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    for split, lines in {"train": ["run/v0"], "val": ["swim/v0"],
                         "test": ["walk/v0", "jump/v1"]}.items():
        (leaky / f"{split}list.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="adapted on train data.*class jump.*video jump/v1"):
        run_extract(replace(extract, split_dir=str(leaky), out=str(tmp_path / "d.zarr")), CPU,
                    ONE, echo=lambda m: None)
    # a sidecar that describes other bytes is not trusted
    Path(sidecar_path(weights)).write_text(json.dumps({**meta, "weights_sha256": "0" * 64}))
    loaded = Backbone.prepare("resnet18", str(weights), 0, CPU, image_size=32, resize=36)
    assert loaded.weights.provenance is None and "describes other weights" in \
        loaded.weights.warning


@pytest.mark.slow
def test_bad_videos_are_reported_and_skipped(tmp_path):
    videos = {**VIDEOS, "sit/v3": ("corrupt", 0)}
    build_dataset(tmp_path / "root", tmp_path / "splits", videos, SPLITS)
    cfg = config((tmp_path / "root", tmp_path / "splits"), tmp_path / "w.pt", micro_batch=1,
                 epochs=1, held_out=0)
    summary = adapt(cfg)  # micro-batches of one: the bad video's is empty, training goes on
    assert [f["video"] for f in summary.failed] == ["sit/v3"]
    assert summary.history[0].held_out_accuracy is None
    assert json.loads(Path(sidecar_path(tmp_path / "w.pt")).read_text())["failed"][0][
        "video"] == "sit/v3"


def test_refusals(data, tmp_path):
    with pytest.raises(UserError, match="open_clip"):
        adapt(config(data, tmp_path / "w.pt", backbone="clip:RN50/openai"))
    with pytest.raises(UserError, match="not a multiple"):
        adapt(config(data, tmp_path / "w.pt", batch_size=4, micro_batch=3))
    with pytest.raises(UserError, match="fewer than --batch-size"):
        adapt(config(data, tmp_path / "w.pt", batch_size=12, micro_batch=12))
    with pytest.raises(UserError, match="nothing to continue"):
        adapt(config(data, tmp_path / "w.pt", resume=True))


def test_an_unknown_dataset_is_an_error_naming_the_known_ones(data, tmp_path):
    # It once fell back silently to the custom recipe (AdamW, batch 16) for any unknown name.
    with pytest.raises(UserError, match=r"unknown dataset 'ucf-101'.*ucf101, hmdb51.*custom"):
        config(data, tmp_path / "w.pt", dataset="ucf-101", optimizer=None, lr=None)


def test_a_dataset_without_videos_is_no_dataset_to_adapt_on(data, tmp_path):
    # the synth command's cache has a train-heads recipe in the datasets table, but no videos
    with pytest.raises(UserError, match=r"unknown dataset 'synthetic' for adapt-backbone"):
        config(data, tmp_path / "w.pt", dataset="synthetic", optimizer=None, lr=None)


def test_learning_rate_warms_up_then_decays():
    rates = [lr_at(step, 10, 2, 1.0) for step in range(10)]
    assert rates[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(rates[1:], rates[2:])) and rates[-1] < 0.05


def test_training_views_are_the_papers_augmentation(data):
    from extract.adapt_data import view_tasks

    cfg = config(data, "w.pt", frames=4)
    records = base_data(cfg).train[:1]
    first, again, other = (view_tasks(records, cfg, e, "bilinear")[0].plan(40)[0]
                           for e in (0, 0, 1))
    assert first == again and first != other  # a function of (seed, video, epoch)
    assert [i // 10 for i in first.indices] == [0, 1, 2, 3]  # one frame per segment
    centre = view_tasks(records, cfg, -1, "bilinear")[0].plan(40)
    assert centre == plan_views(40, frames=4, video_id=records[0].video_id, resize=36,
                                image_size=32)


@pytest.mark.slow
def test_cli_prints_the_weights_and_the_next_command(data, tmp_path):
    root, split_dir = data
    args = ["adapt-backbone", "--dataset", "custom", "--root", str(root), "--split-dir",
            str(split_dir), "--out", str(tmp_path / "w.pt"), "--backbone", "resnet18",
            "--weights", "none", "--frames", "2", "--image-size", "32", "--resize", "36",
            "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"weights  {tmp_path / 'w.pt'}" in result.output
    assert f"python cli.py extract --dataset custom --root {root}" in result.output


def _torchrun(args, cwd, processes):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={processes}", "cli.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_two_ddp_processes_match_one_process(data, tmp_path):
    root, split_dir = data
    common = ["adapt-backbone", "--dataset", "custom", "--root", str(root), "--split-dir",
              str(split_dir), "--backbone", "resnet18", "--weights", "none", "--frames", "2",
              "--image-size", "32", "--resize", "36", "--epochs", "2", "--batch-size", "4",
              "--micro-batch", "2", "--optimizer", "sgd", "--lr", "0.05", "--workers", "0",
              "--device", "cpu"]
    two = _torchrun([*common, "--out", str(tmp_path / "two.pt")], REPO, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _torchrun([*common, "--out", str(tmp_path / "one.pt")], REPO, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load(tmp_path / "one.pt"), load(tmp_path / "two.pt")
    moved = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert moved < 1e-4, moved  # same micro-batches, same gradients: float rounding only
    assert torch.equal(a["layer1.0.bn1.num_batches_tracked"],
                       b["layer1.0.bn1.num_batches_tracked"])
    meta = json.loads(Path(sidecar_path(tmp_path / "two.pt")).read_text())
    assert meta["world_size"] == 2 and meta["weights_sha256"] == file_sha256(tmp_path / "two.pt")
    assert not np.allclose(a["fc.weight"].numpy(), 0)  # it did train
