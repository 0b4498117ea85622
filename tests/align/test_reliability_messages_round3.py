"""Issue 24, one line instead of a traceback: a nonsense device name, an oversized toy dataset,
a disk that refuses a checkpoint, a URL whose file-system package is missing, a report with a
non-numeric episode accuracy."""

import json

import pytest
import torch
from click.testing import CliRunner

from align.checkpoints import save_head
from align.models import build_head
from cache import UserError
from cli import cli, pick_device


def one_line(result, *named):
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    for text in named:
        assert text in result.output, result.output
    return result.output


@pytest.mark.parametrize("name", ["nonsense", "cuda:x", "cpu:0:1", "gpu"])
def test_a_nonsense_device_name_is_one_line(name):
    with pytest.raises(UserError, match="device"):
        pick_device(name)


def test_sweep_devices_nonsense_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line(CliRunner().invoke(cli, ["sweep", "table3", "--devices", "nonsense"]), "nonsense")


def test_toy_data_refuses_an_oversized_frame_before_allocating(tmp_path):
    result = CliRunner().invoke(cli, ["toy-data", "--out", str(tmp_path / "t"), "--size",
                                      "100000"])
    one_line(result, "--size")
    assert not (tmp_path / "t").exists()


def test_a_checkpoint_the_disk_refuses_is_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):  # what torch raises when the file-size limit or disk is hit
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", refuse)
    with pytest.raises(UserError, match="cannot write .*last.pt.*file write failed"):
        save_head(build_head("protonet", channels=4, frames=4, height=2, width=2),
                  tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_a_url_whose_package_is_missing_is_one_line():
    one_line(CliRunner().invoke(cli, ["info", "gcs://bucket/cache.zarr"]), "gcsfs")


def test_compare_refuses_a_non_numeric_episode_accuracy(tmp_path):
    report = {"per_class_accuracy": {"a": 50.0}, "episode_accuracy": ["x", 1.0],
              "split": "test", "episodes": 2}
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(report))
    result = CliRunner().invoke(cli, ["analyze", "compare", str(tmp_path / "a.json"),
                                      str(tmp_path / "b.json"), "--out", str(tmp_path / "o")])
    one_line(result, "episode_accuracy")


# ------------------------------------------------------------------------------ item 19
@pytest.mark.parametrize("option, value", [("momentum", 50), ("micro-batch", -2),
                                           ("workers", -1), ("dropout", 1.0), ("way", 1),
                                           ("val-episodes", -3), ("lr", 0)])
def test_a_sweep_file_refuses_what_the_cli_refuses(option, value):
    from align.sweep import parse_assignments, parse_spec

    with pytest.raises(UserError, match=f"--{option}"):
        parse_spec({"run": [{"name": "a", option: value}]}, "f.toml")
    with pytest.raises(UserError, match=f"--{option}"):
        parse_assignments([f"{option}={value}"])
    result = CliRunner().invoke(cli, ["train-heads", f"--{option}", str(value)])
    assert result.exit_code in (1, 2) and f"--{option}" in result.output, result.output


def test_the_cli_ranges_are_the_declared_ones():
    """train-heads' click types come from the one declaration (the fields' ``option``)."""
    import click

    from align.recipes import TrainConfig
    from cache.options import OPTION, declared_fields

    params = {p.name: p for p in cli.commands["train-heads"].params}
    ranged = [f for f in declared_fields(TrainConfig) if f.metadata[OPTION].range is not None]
    for f in ranged:
        declared, param = f.metadata[OPTION].range, params[f.name]
        assert isinstance(param.type, click.IntRange | click.FloatRange), f.name
        assert (param.type.min, param.type.max, param.type.min_open, param.type.max_open) \
            == (declared.low, declared.high, declared.low_open, declared.high_open), f.name
    assert len(ranged) == 21  # every numeric option of train-heads
