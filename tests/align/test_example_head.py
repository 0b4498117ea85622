"""The manual's "Adding a head" example (docs/extending.md) is real: the code block, registered
in the registry, trains through the ordinary loop and reloads from its checkpoint."""

import re
from pathlib import Path

import torch

from align.checkpoints import load_head
from align.models import registry
from align.recipes import TrainConfig
from align.train import train

EXTENDING = Path(__file__).resolve().parents[2] / "docs" / "extending.md"
QUIET = dict(device=torch.device("cpu"), progress=False, log=lambda message: None)


def example_head_class():
    text = EXTENDING.read_text()
    section = text[text.index("## Adding a head"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(EXTENDING), "exec"), namespace)  # the manual's own code
    return namespace["ScaledProtoNet"]


def test_documented_example_head_trains_and_reloads(tmp_path, monkeypatch, make_synth):
    head_cls = example_head_class()
    monkeypatch.setitem(registry.HEADS, head_cls.kind, head_cls)
    monkeypatch.chdir(tmp_path)
    cache = make_synth(tmp_path / "synth.zarr")
    cfg = TrainConfig(cache=cache, out=str(tmp_path / "run"), head=head_cls.kind,
                      head_options={"init": 0.5}, shot=1, queries=2, epochs=2,
                      episodes_per_epoch=4, tasks_per_batch=2, lr=0.1, val_every=1,
                      val_episodes=3)
    summary = train(cfg, **QUIET)
    assert summary["epochs_done"] == 2
    head = load_head(tmp_path / "run" / "last.pt")
    assert isinstance(head, head_cls) and head.config.options == {"init": 0.5}
    assert not torch.equal(head.scale, torch.full_like(head.scale, 0.5))  # it learnt something
