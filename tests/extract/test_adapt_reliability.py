"""Issue 24 (adapt-backbone): a truncated last.pt on --resume and an unwritable --out are one
line each, before any training."""

import pytest
import torch
from extract_testing import build_dataset

from cache import UserError
from extract.adapt import AdaptConfig
from extract.adapt_train import run_adapt
from extract.plan import Shard

VIDEOS = {f"{c}/v{k}": ("frames", 4) for c in ("jump", "run") for k in range(2)}
SPLITS = {"train": list(VIDEOS), "val": [], "test": []}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("adapt-rel")
    build_dataset(base / "root", base / "splits", VIDEOS, SPLITS)
    return base / "root", base / "splits"


def adapt(data, out, **changes):
    root, split_dir = data
    cfg = AdaptConfig(**{**dict(dataset="custom", root=str(root), split_dir=str(split_dir),
                                out=str(out), backbone="resnet18", weights="none", frames=2,
                                image_size=32, resize=36, epochs=1, batch_size=2, micro_batch=2,
                                held_out=0.0, workers=0), **changes})
    return run_adapt(cfg, torch.device("cpu"), Shard(0, 1, 0), echo=lambda m: None)


def test_resume_from_a_truncated_last_pt_is_one_line(data, tmp_path):
    out = tmp_path / "w.pt"
    (tmp_path / "w.run").mkdir()
    (tmp_path / "w.run" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="last.pt: not a readable torch file"):
        adapt(data, out, resume=True)


def test_resume_from_a_last_pt_of_something_else_is_one_line(data, tmp_path):
    (tmp_path / "w.run").mkdir()
    torch.save({"weights": torch.zeros(1)}, tmp_path / "w.run" / "last.pt")
    with pytest.raises(UserError, match="not a checkpoint of adapt-backbone"):
        adapt(data, tmp_path / "w.pt", resume=True)


def test_an_unwritable_out_is_refused_before_training(data, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    import extract.adapt_train as adapt_train  # where prepare looks base_data up

    monkeypatch.setattr(adapt_train, "base_data", lambda config: pytest.fail("work started"))
    with pytest.raises(UserError, match="cannot write"):
        adapt(data, tmp_path / "file" / "w.pt")
