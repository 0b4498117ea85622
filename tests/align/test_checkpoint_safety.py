"""Issue 10, security: loading a checkpoint or weights file never runs code from it, and a
damaged file is one line naming it - in every command that reads one."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from align.checkpoints import load_head, load_head_checkpoint, save_head
from align.models import build_head
from cache import UserError
from cli import cli


class Payload:
    """Unpickling this object creates a marker file: the proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def malicious(path: Path, marker: Path) -> Path:
    head = build_head("protonet", channels=4, frames=4, height=4, width=4)
    torch.save({"format": "ta2n-cache/head", "version": 1, "config": head.config.__dict__,
                "state_dict": {}, "extra": {"evil": Payload(marker)}}, path)
    return path


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = malicious(tmp_path / "evil.pt", marker)
    with pytest.raises(UserError, match="never unpickles code"):
        load_head(path)
    assert not marker.exists()


@pytest.mark.parametrize("command", [
    ["evaluate", "--checkpoint", "{ckpt}", "--cache", "{cache}"],
    ["visualize", "--checkpoint", "{ckpt}", "--cache", "{cache}"],
    ["analyze", "embedding", "{cache}", "--checkpoint", "{ckpt}"],
])
def test_every_command_refuses_it_in_one_line(tmp_path, monkeypatch, make_synth, command):
    monkeypatch.chdir(tmp_path)
    cache = make_synth(tmp_path / "s.zarr", frames=4)
    marker = tmp_path / "pwned"
    ckpt = malicious(tmp_path / "evil.pt", marker)
    args = [a.format(ckpt=ckpt, cache=cache) for a in command]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "never unpickles code" in result.output
    assert not marker.exists()


def test_backbone_weights_that_would_run_code_are_refused(tmp_path):
    from extract.resnet_backbone import load_backbone

    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": torch.zeros(1), "evil": Payload(marker)}, tmp_path / "w.pt")
    with pytest.raises(UserError, match="never unpickles code"):
        load_backbone("resnet18", str(tmp_path / "w.pt"))
    assert not marker.exists()


def test_resume_refuses_a_malicious_last_pt(tmp_path, monkeypatch, make_synth):
    monkeypatch.chdir(tmp_path)
    cache = make_synth(tmp_path / "s.zarr")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"cache": cache}}))
    marker = tmp_path / "pwned"
    malicious(run / "last.pt", marker)
    result = CliRunner().invoke(cli, ["train-heads", "--resume", str(run)])
    assert result.exit_code != 0 and "never unpickles code" in result.output
    assert not marker.exists()


def test_our_checkpoints_and_numpy_metrics_still_load(tmp_path):
    head = build_head("ta2n", channels=8, frames=4, height=4, width=4)
    save_head(head, tmp_path / "ours.pt", extra={"val_acc": np.float64(51.5), "epoch": 3,
                                                 "dtype": np.dtype("float32")})
    loaded, extra = load_head_checkpoint(tmp_path / "ours.pt")
    assert extra["val_acc"] == 51.5 and extra["epoch"] == 3
    for a, b in zip(head.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_a_truncated_checkpoint_is_one_line_naming_it(tmp_path):
    path = tmp_path / "best.pt"
    save_head(build_head("ta2n", channels=8, frames=4, height=4, width=4), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=r"best\.pt: not a readable torch file"):
        load_head(path)
