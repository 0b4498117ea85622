"""A backbone family is one module that registers itself: a family declared and registered
here (``toy:<width>``, a small strided conv) is taken by ``parse_backbone``, named in the
accepted-forms error and the registry's --backbone help text (``prefixed_forms``), gets the
shared ``--weights`` handling (seeded ``none`` with its warning, a file, the missing-file error),
and ``extract`` runs with it end to end on generated videos. The fixture removes it again.

The CLI's --help text is built when ``cli`` is imported (click options are made then), so a family
registered later shows in its errors, not in an already-built --help."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from extract_testing import build_dataset
from reliability_helpers import run_cli
from torch import nn

from cache import FeatureCache, UserError
from extract.backbone import Preprocessing
from extract.backbones import (
    RANDOM_INIT_WARNING,
    BackboneFamily,
    Loaded,
    accepted_forms,
    parse_backbone,
    prefixed_forms,
    register,
    seeded,
    unregister,
)

REPO = Path(__file__).resolve().parents[2]
STRIDE = 8


class ToyFamily(BackboneFamily):
    """``toy:<width>``: one 3 x 3 conv of ``width`` channels with stride 8."""

    library = "toy"
    prefix = "toy:"
    form = "toy:<width>"
    about = "a strided conv of the tests, toy:<width>"
    feature = "the conv's output"

    def parse(self, name):
        width = name.removeprefix(self.prefix)
        if not width.isdigit():
            raise UserError(f"toy: the width must be a number, not {width!r}")
        return width, None

    def preprocessing(self, spec):
        return Preprocessing((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 32, 1.0, "the test")

    def build(self, spec, image_size):
        return nn.Conv2d(3, int(spec.arch), 3, stride=STRIDE, padding=1)

    def load_pretrained(self, spec, seed, image_size):
        return Loaded(seeded(123, lambda: self.build(spec, image_size)), "toy seed 123",
                      "toy weights", None)

    def load_file(self, spec, path, seed, image_size):
        module = self.build(spec, image_size)
        module.load_state_dict(torch.load(path, weights_only=True))
        return module, "toy state dict"


@pytest.fixture
def toy():
    family = register(ToyFamily())
    yield family
    unregister(family.library)


def test_a_registered_family_is_parsed_listed_and_removed(toy):
    spec = parse_backbone(" toy:4 ")
    assert (spec.family, spec.library, spec.arch, spec.name) == (toy, "toy", "4", "toy:4")
    assert "toy:<width>" in accepted_forms() and "toy:... a strided conv" in prefixed_forms()
    with pytest.raises(UserError, match="use one of resnet18.*timm:.*clip:.*toy:<width>"):
        parse_backbone("vgg16")
    with pytest.raises(UserError, match="width must be a number"):
        parse_backbone("toy:wide")
    with pytest.raises(ValueError, match="clashes"):
        register(ToyFamily())


def test_no_family_left_after_the_fixture():
    assert "toy:" not in accepted_forms()
    with pytest.raises(UserError, match="unknown backbone 'toy:4'"):
        parse_backbone("toy:4")


def test_the_registry_loads_weights_for_every_family(toy, tmp_path):
    spec = parse_backbone("toy:4")
    module, info = spec.load("none", 7, 32)
    again, _ = spec.load("none", 7, 32)
    assert (info.source, info.warning) == ("none", RANDOM_INIT_WARNING)
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert torch.equal(module.weight, again.weight)
    assert spec.load("none", 8, 32)[1].state_sha256 != info.state_sha256
    assert spec.load("pretrained", 0, 32)[1].source == "pretrained"
    torch.save(module.state_dict(), tmp_path / "toy.pt")
    loaded, from_file = spec.load(str(tmp_path / "toy.pt"), 0, 32)
    assert (from_file.source, from_file.format) == ("file", "toy state dict")
    assert from_file.state_sha256 == info.state_sha256 and from_file.sha256
    with pytest.raises(UserError, match="no such file"):
        spec.load(str(tmp_path / "absent.pt"), 0, 32)


def test_the_cli_refuses_an_unknown_name_naming_the_registered_family(toy, tmp_path):
    result = run_cli(["extract", "--dataset", "ucf101", "--backbone", "vgg16"], tmp_path)
    assert result.exit_code == 2 and "toy:<width>" in result.output


def test_extract_runs_with_a_registered_family(toy, tmp_path):
    videos = {"a/v0": ("frames", 6), "a/v1": ("frames", 7), "b/v0": ("frames", 8)}
    lines = {"train": ["a/v0", "a/v1"], "test": ["b/v0"]}
    build_dataset(tmp_path / "root", tmp_path / "splits", videos, lines)
    out = tmp_path / "toy.zarr"
    result = run_cli(["extract", "--dataset", "custom", "--root", tmp_path / "root",
                      "--split-dir", tmp_path / "splits", "--splits", "train,test",
                      "--out", out, "--backbone", "toy:4", "--weights", "none", "--frames", "2",
                      "--workers", "0", "--device", "cpu"], tmp_path)
    assert result.exit_code == 0, result.output
    with FeatureCache.open(out) as cache:
        assert cache.done.all() and len(cache.video_ids) == 3
        assert cache.shape == (4, 2, 32 // STRIDE, 32 // STRIDE)  # image size from the family
        attrs = cache.attrs
        assert cache.read_row(0).any()
    assert attrs["backbone_info"] == {"name": "toy:4", "library": "toy", "arch": "4",
                                      "tag": None, "feature": "the conv's output",
                                      "channels": 4, "grid": [4, 4]}
    assert attrs["weights"]["source"] == "none"


def test_importing_the_cli_imports_neither_timm_nor_open_clip():
    code = ("import sys, cli; from extract.backbones import families; families(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'open_clip')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
