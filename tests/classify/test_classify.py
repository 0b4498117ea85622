"""classify on generated clips with a small training-free classifier (random resnet18, 32 px,
T = 2): the CSV and its columns, known labels and accuracy, --features reuse (a rerun decodes
nothing and writes the same CSV), every bad input, the recipe mismatch refusal, the CLI."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch
from click.testing import CliRunner
from clips_testing import corrupt, frame_folder, support_and_queries, video

import classify.encode as encode
from cache import UserError
from classify import FewShotClassifier
from classify.command import ClassifyConfig, classify_command
from classify.report import csv_columns
from cli import cli

CPU = torch.device("cpu")
SMALL = dict(backbone="resnet18", weights="none", frames=2, image_size=32)


def small(**options) -> FewShotClassifier:
    return FewShotClassifier.training_free("protonet", **{**SMALL, **options})


def config(tmp_path, support, *queries, **options) -> ClassifyConfig:
    return ClassifyConfig(support=str(support), query=tuple(str(q) for q in queries),
                          out=str(tmp_path / "predictions.csv"), head="protonet",
                          backbone="resnet18", weights="none", frames=2, image_size=32,
                          **options)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_csv_and_accuracy(tmp_path):
    support, query = support_and_queries(tmp_path)
    corrupt(query / "b" / "broken.mp4")
    lines = []
    result = classify_command(config(tmp_path, support, query), device=CPU, log=lines.append,
                              progress=False)
    rows = read_csv(tmp_path / "predictions.csv")
    assert list(rows[0]) == csv_columns(["a", "b", "c"]) == [
        "query", "predicted", "probability", "runner_up", "margin", "p_a", "p_b", "p_c",
        "status", "true_class", "in_support"]
    by_name = {r["query"].split("/")[-1]: r for r in rows}
    assert set(by_name) == {"qa", "qb.mp4", "broken.mp4", "q"}
    for name in ("qa", "qb.mp4", "q"):
        row = by_name[name]
        probs = [float(row[f"p_{c}"]) for c in "abc"]
        assert row["status"] == "ok" and sum(probs) == pytest.approx(1, abs=1e-5)
        assert float(row["probability"]) == pytest.approx(max(probs), abs=1e-6)
        assert row["predicted"] == "abc"[probs.index(max(probs))]
        runner = sorted(probs)[-2]
        assert float(row["margin"]) == pytest.approx(max(probs) - runner, abs=2e-6)
    assert by_name["qa"]["true_class"] == "a" and by_name["q"]["true_class"] == ""
    # the unreadable query is a failed row; the others went on, and the summary counts it
    assert by_name["broken.mp4"]["status"].startswith("failed: ")
    assert by_name["broken.mp4"]["predicted"] == "" and by_name["broken.mp4"]["true_class"] == "b"
    text = "\n".join(lines)
    assert "4 queries: 3 classified, 1 failed" in text and "broken.mp4" in text
    known = [p for p in result["predictions"] if p["truth"] and p["status"] == "ok"]
    right = sum(p["label"] == p["truth"] for p in known)
    assert result["accuracy"]["queries"] == 2
    assert result["accuracy"]["accuracy"] == pytest.approx(100 * right / 2)
    assert sum(map(sum, result["accuracy"]["confusion"]["matrix"])) == 2
    assert "accuracy " in text and "confusion" in text


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """The paths classify decodes, in order."""
    paths = []

    class CountingPool(encode.DecodePool):
        def imap(self, tasks):
            tasks = list(tasks)
            paths.extend(t.path for t in tasks)
            return super().imap(tasks)

    monkeypatch.setattr(encode, "DecodePool", CountingPool)
    return paths


def test_each_clip_is_decoded_once(tmp_path, decoded):
    """A support clip given as a query too, and the queries explained after predict, are not
    decoded again (without --features)."""
    support, query = support_and_queries(tmp_path)
    clf = small().fit(support)
    predictions = clf.predict([query, support / "b" / "b1"])
    clf.explain(predictions[0].query)
    assert sorted(decoded) == sorted(map(str, [
        support / "a" / "a1", support / "a" / "a2.mp4", support / "b" / "b1",
        support / "c" / "c1.mp4", query / "a" / "qa", query / "b" / "qb.mp4",
        query / "loose" / "q"]))


def test_features_rerun_decodes_nothing(tmp_path, decoded):
    support, query = support_and_queries(tmp_path)
    corrupt(query / "broken.mp4")
    cfg = config(tmp_path, support, query, features=str(tmp_path / "feats"))
    first = classify_command(cfg, device=CPU, log=lambda m: None, progress=False)
    assert len(decoded) == 8 and first["computed"] == 8  # 4 support + 4 query clips
    saved = (tmp_path / "predictions.csv").read_bytes()
    decoded.clear()
    cfg.overwrite = True
    again = classify_command(cfg, device=CPU, log=lambda m: None, progress=False)
    assert decoded == [] and again["computed"] == 0 and again["reused"] == 8
    assert (tmp_path / "predictions.csv").read_bytes() == saved
    # a moved, renamed copy of a clip is the same clip (content key): still nothing decoded
    shutil.copytree(query / "loose" / "q", tmp_path / "elsewhere" / "renamed")
    clf = small(features=str(tmp_path / "feats")).fit(support)
    assert decoded == [] and clf.predict(tmp_path / "elsewhere")[0].ok


def test_a_store_of_another_recipe_is_refused(tmp_path):
    support, query = support_and_queries(tmp_path)
    small(features=str(tmp_path / "feats")).fit(support)
    with pytest.raises(UserError, match=r"holds maps of resnet18 .*T=2, 32 px.* not of this "
                                        r"classifier's resnet18 .*T=3, 32 px"):
        small(frames=3, features=str(tmp_path / "feats"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="classify did not make"):
        small(features=str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_bad_support_sets(tmp_path):
    clf = small()
    frame_folder(tmp_path / "one" / "a" / "x", 1)
    with pytest.raises(UserError, match=r"1 class\(es\) \(a\); classify needs at least 2"):
        clf.fit(tmp_path / "one")
    frame_folder(tmp_path / "broken" / "a" / "x", 1)
    corrupt(tmp_path / "broken" / "b" / "bad.mp4")
    with pytest.raises(UserError, match=r"support class 'b' has no readable clip \(.*bad\.mp4"):
        clf.fit(tmp_path / "broken")
    frame_folder(tmp_path / "empty" / "a" / "x", 1)
    (tmp_path / "empty" / "b").mkdir(parents=True)
    (tmp_path / "empty" / "b" / "notes.txt").write_text("not a clip")
    with pytest.raises(UserError, match="support class 'b' has no readable clip"):
        clf.fit(tmp_path / "empty")
    # an unreadable clip of a class that has others is left out with a warning
    warnings = []
    clf = small(log=warnings.append)
    frame_folder(tmp_path / "mixed" / "a" / "x", 1)
    corrupt(tmp_path / "mixed" / "a" / "bad.mp4")
    frame_folder(tmp_path / "mixed" / "b" / "y", 2)
    clf.fit(tmp_path / "mixed")
    assert clf.support_paths == {"a": [str(tmp_path / "mixed/a/x")],
                                 "b": [str(tmp_path / "mixed/b/y")]}
    assert any("bad.mp4 is left out" in w for w in warnings)


def test_the_same_clip_in_support_and_query_is_warned_about(tmp_path):
    support, _ = support_and_queries(tmp_path)
    copy = tmp_path / "queries" / "copy.mp4"
    copy.parent.mkdir()
    shutil.copy(support / "a" / "a2.mp4", copy)  # same content, another name
    video(tmp_path / "queries" / "new.mp4", 9)
    warnings = []
    predictions = small(log=warnings.append).fit(support).predict(tmp_path / "queries")
    flags = {p.query.split("/")[-1]: p.in_support for p in predictions}
    assert flags == {"copy.mp4": True, "new.mp4": False}
    assert any("copy.mp4 is the same clip as support clip" in w and "a2.mp4" in w
               for w in warnings)


def test_the_api_takes_a_dict_and_explains(tmp_path):
    support, query = support_and_queries(tmp_path)
    clf = small().fit({"first": [support / "a" / "a1", support / "a" / "a2.mp4"],
                       "second": [support / "b" / "b1"]})
    assert clf.classes == ["first", "second"]
    prediction = clf.predict([query / "b" / "qb.mp4"])[0]
    assert prediction.ok and prediction.truth is None and prediction.label in clf.classes
    why = clf.explain(query / "b" / "qb.mp4")
    assert why["label"] == prediction.label and why["support_clip"] in {
        str(p) for p in clf.support_paths[prediction.label]}
    assert why["record"]["logits"].shape == (1, 1)
    assert clf.frames(query / "b" / "qb.mp4").shape == (2, 32, 32, 3)


def test_outputs_are_checked_before_any_work(tmp_path):
    support, query = support_and_queries(tmp_path)
    (tmp_path / "predictions.csv").write_text("mine")
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        classify_command(config(tmp_path, support, query), device=CPU, progress=False)
    assert (tmp_path / "predictions.csv").read_text() == "mine"
    with pytest.raises(UserError, match="--checkpoint or --head, not both"):
        classify_command(config(tmp_path, support, query, overwrite=True, checkpoint="x.pt"),
                         device=CPU, progress=False)


def test_cli_classify(tmp_path, monkeypatch):
    support, query = support_and_queries(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, [
        "classify", "--head", "protonet", "--backbone", "resnet18", "--weights", "none",
        "--frames", "2", "--image-size", "32", "--support", str(support), "--query",
        str(query / "a"), "--query", str(query / "loose" / "q"), "--json", "out.json",
        "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "2 queries: 2 classified, 0 failed" in result.output
    assert len(read_csv(tmp_path / "predictions.csv")) == 2 and (tmp_path / "out.json").exists()
    result = CliRunner().invoke(cli, ["classify", "--head", "protonet", "--support",
                                      str(support), "--query", str(query), "--out", "b.csv",
                                      "--device", "cpu"])
    assert result.exit_code == 1 and "one of them" in result.output
