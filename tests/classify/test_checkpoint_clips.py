"""classify with checkpoints, as a person after `make demo`: toy videos, a cache extracted from
them, a 5-way 1-shot TA2N trained by train-heads (the real commands), then folders of clips of
the test classes. The clip maps are extract's own; 7 classes with the 5-way checkpoint and
classes of different clip counts; a 5-shot checkpoint file on its own; the cache mismatch
refusal; the docs page's Python example."""

from __future__ import annotations

import contextlib
import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from align.checkpoints import save_head
from align.models import build_head
from cache import FeatureCache, UserError
from classify import FewShotClassifier
from classify.encode import ClipEncoder, Recipe
from cli import run_in_process

CPU = torch.device("cpu")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "own-videos.md"
pytestmark = pytest.mark.slow


def run(args: list[str], workdir: Path) -> str:
    status, output = run_in_process([str(a) for a in args], str(workdir), True)
    assert status == 0, output
    return output


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The demo's layout in miniature: data/demo, caches/demo.zarr, runs/demo/ta2n/best.pt,
    my-clips/{support,query}/<test class>/ (class i has 1 + i % 2 support clips)."""
    base = tmp_path_factory.mktemp("world")
    run(["toy-data", "--out", "data/demo", "--train-classes", 5, "--val-classes", 0,
         "--test-classes", 7, "--videos-per-class", 3, "--frames", 8, "--size", 32], base)
    run(["extract", "--dataset", "custom", "--root", "data/demo/videos", "--split-dir",
         "data/demo/splits", "--out", "caches/demo.zarr", "--backbone", "resnet18",
         "--weights", "none", "--frames", 4, "--image-size", 128, "--resize", 128,
         "--workers", 0, "--device", "cpu"], base)
    run(["train-heads", "--cache", "caches/demo.zarr", "--head", "ta2n", "--way", 5,
         "--shots", 1, "--queries", 1, "--epochs", 1, "--episodes-per-epoch", 1,
         "--val-episodes", 0, "--device", "cpu", "--out", "runs/demo/ta2n"], base)
    lines = (base / "data/demo/splits/testlist.txt").read_text().split()
    classes = sorted({line.split("/")[0] for line in lines})
    for i, name in enumerate(classes):
        videos = sorted(line for line in lines if line.startswith(name + "/"))
        k = 1 + i % 2
        for part, picked in (("support", videos[:k]), ("query", videos[k:])):
            (base / "my-clips" / part / name).mkdir(parents=True, exist_ok=True)
            for line in picked:
                shutil.copy(base / "data/demo/videos" / f"{line}.mp4",
                            base / "my-clips" / part / name)
    return base


def test_clip_maps_are_the_ones_extract_stored(world):
    with FeatureCache.open(world / "caches/demo.zarr") as cache:
        recipe = Recipe.from_cache(cache.attrs, "the cache")
        rows = cache.rows("test")[:3]
        stored = cache.read_rows(rows, dtype="float32")
        ids = [str(v) for v in cache.video_ids[rows]]
    from classify.clips import Clip
    clips = {v: Clip(str(world / "data/demo/videos" / f"{v}.mp4"), "file") for v in ids}
    with contextlib.chdir(world):  # extract recorded --weights none: nothing to find on disk
        encoder = ClipEncoder(recipe, CPU)
    maps, failed = encoder.encode(clips, progress=False)
    assert not failed
    got = np.stack([maps[v] for v in ids]).astype(np.float32)
    assert not np.allclose(got[0], got[1])  # the maps tell clips apart
    np.testing.assert_allclose(got, stored, rtol=2e-3, atol=2e-3)


def test_seven_classes_with_the_five_way_checkpoint(world):
    """The CLI as a person runs it: the run's cache found from the checkpoint, 7 classes of 1 or
    2 clips (K rule "one": the 1-shot head with 2 clips), labelled queries, figures, JSON."""
    out = run(["classify", "--checkpoint", "runs/demo/ta2n/best.pt", "--support",
               "my-clips/support", "--query", "my-clips/query", "--out", "p.csv", "--json",
               "p.json", "--figures", "figs", "--device", "cpu"], world)
    with open(world / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 * 3 - 10  # 3 videos per class, 1 or 2 of them in the support set
    assert all(r["status"] == "ok" and r["true_class"] for r in rows)
    assert len([c for c in rows[0] if c.startswith("p_")]) == 7
    assert "K rule 'one', trained with K = 1" in out and "accuracy" in out
    right = sum(r["predicted"] == r["true_class"] for r in rows)
    assert re.search(rf"accuracy\s+{100 * right / len(rows):.2f} % of {len(rows)} queries", out)
    figures = sorted((world / "figs").glob("*.png"))
    assert len(figures) == len(rows) and (world / "figs/index.json").exists()


def test_a_five_shot_checkpoint_on_its_own(world, tmp_path):
    """A 5-shot checkpoint file with no run folder (its cache named in the file), classes of 1
    and 2 clips: K rule "many"; a cache moved away is named."""
    with FeatureCache.open(world / "caches/demo.zarr") as cache:
        c, t, h, w = cache.shape
    head = build_head("ta2n", channels=c, frames=t, height=h, width=w, shot=5, seed=3)
    save_head(head, tmp_path / "five.pt",
              extra={"config": {"cache": str(world / "caches/demo.zarr")}})
    with contextlib.chdir(world):
        clf = FewShotClassifier.from_checkpoint(tmp_path / "five.pt").fit("my-clips/support")
        predictions = clf.predict("my-clips/query")
    assert clf.head.shot_rule == "many" and all(p.ok for p in predictions)
    assert [len(v) for v in clf.support_paths.values()] == [1, 2, 1, 2, 1, 2, 1]
    save_head(head, tmp_path / "lost.pt", extra={"config": {"cache": "nowhere/gone.zarr"}})
    with pytest.raises(UserError, match="cache nowhere/gone.zarr is not here .*pass --cache"):
        FewShotClassifier.from_checkpoint(tmp_path / "lost.pt")


def test_a_cache_of_another_t_is_refused(world, tmp_path):
    run(["extract", "--dataset", "custom", "--root", "data/demo/videos", "--split-dir",
         "data/demo/splits", "--splits", "test", "--limit", 1, "--out",
         str(tmp_path / "t2.zarr"), "--backbone", "resnet18", "--weights", "none", "--frames",
         2, "--image-size", 128, "--resize", 128, "--workers", 0, "--device", "cpu"], world)
    with contextlib.chdir(world), pytest.raises(
            UserError, match=r"holds features of resnet18 .*T=2.* was trained on features of "
                             r"resnet18 .*T=4"):
        FewShotClassifier.from_checkpoint("runs/demo/ta2n/best.pt", cache=tmp_path / "t2.zarr")


def test_the_docs_python_example_runs(world, capsys):
    """docs/own-videos.md's example, as written, in the folder `make demo` leaves."""
    code = DOCS.read_text().split("```python\n")[1].split("```")[0]
    with contextlib.chdir(world):
        exec(compile(code, str(DOCS), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 11 + 1 and all(line.endswith(" ok") for line in printed[:11])
    assert "tc_attention" in printed[-1] and (world / "clip-features/clip-features.json").exists()
    assert (world / printed[-1].split()[0]).is_file()  # the support clip it shows
