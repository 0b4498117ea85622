"""The backbone: weights-file formats (incl. the authors' TA2N checkpoints), errors, forward."""

import urllib.error

import numpy as np
import pytest
import torch
import torchvision.models._api as tv_api
from extract_testing import random_resnet18
from torchvision.transforms.v2 import functional as tvf

from cache import UserError
from extract.backbone import FeatureExtractor, state_sha256
from extract.resnet_backbone import load_backbone


@pytest.fixture(scope="module")
def reference():
    """The torchvision resnet18 the files are made from, and its trunk's state hash."""
    net = random_resnet18()
    trunk = torch.nn.Sequential(*list(net.children())[:-2]).eval()
    plain, _ = load_backbone("resnet18", "none")
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")})
    return net, trunk, state_sha256(plain)


def _authors_checkpoint(state, prefix):
    """What the TA2N code saves: the whole model (backbone under `resnet.`) and optimiser state."""
    model = {prefix + k: v for k, v in state.items() if not k.startswith("fc.")}
    model["align.ttm.weight"] = torch.ones(3)
    model["protypicalNet.norm_layer.weight"] = torch.ones(5)
    return {"epoch": 10, "model_state_dict": model,
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.001, "params": [0]}]}}


FORMATS = {
    "plain": (lambda sd: sd, "state dict"),
    "torchvision": (lambda sd: {"model": sd, "epoch": 3, "args": {"lr": 0.1}},
                    "checkpoint ('model')"),
    "lightning-dp": (lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
                     "checkpoint ('state_dict')"),
    "ta2n": (lambda sd: _authors_checkpoint(sd, "resnet."), "TA2N checkpoint"),
    "ta2n-dataparallel": (lambda sd: _authors_checkpoint(sd, "resnet.module."), "TA2N checkpoint"),
}


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.slow
def test_weights_formats_are_detected_and_load_the_same_tensors(tmp_path, reference, name):
    net, trunk, expected_hash = reference
    wrap, fmt = FORMATS[name]
    path = tmp_path / f"{name}.pth"
    torch.save(wrap(net.state_dict()), path)
    loaded, info = load_backbone("resnet18", str(path))
    assert info.format.startswith(fmt) and info.source == "file"
    assert info.state_sha256 == expected_hash and len(info.sha256) == 64
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trunk(x))


@pytest.mark.slow
def test_ta2n_checkpoint_records_its_prefix(tmp_path, reference):
    net, _, _ = reference
    path = tmp_path / "dp.pth"
    torch.save(_authors_checkpoint(net.state_dict(), "resnet.module."), path)
    assert "'resnet.module.'" in load_backbone("resnet18", str(path))[1].format


def test_weights_of_another_resnet_are_refused_with_the_right_backbone_named(tmp_path, reference):
    net, _, _ = reference
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    with pytest.raises(UserError, match="looks like resnet18: pass --backbone resnet18"):
        load_backbone("resnet34", str(path))


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all", "not a readable torch file"),
    (None, "neither a state dict"),
    ({"model_state_dict": {"head.weight": torch.ones(2)}}, "no backbone keys"),
])
def test_unusable_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content if content is not None else {"epoch": 3}, path)
    with pytest.raises(UserError, match=message) as caught:
        load_backbone("resnet18", str(path))
    assert "\n" not in caught.value.message
    with pytest.raises(UserError, match="no such file"):
        load_backbone("resnet18", str(tmp_path / "absent.pth"))


@pytest.mark.slow
def test_none_is_seeded_random_with_a_warning():
    a, info_a = load_backbone("resnet18", "none", seed=0)
    _, info_b = load_backbone("resnet18", "none", seed=0)
    _, info_c = load_backbone("resnet18", "none", seed=1)
    assert info_a.source == "none" and "meaningless" in info_a.warning
    assert info_a.state_sha256 == info_b.state_sha256 != info_c.state_sha256
    assert "warning" not in info_a.to_attrs()


def test_imagenet_offline_says_how_to_pass_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as caught:
        load_backbone("resnet18", "imagenet")
    message = caught.value.message
    assert "\n" not in message and "Temporary failure" in message
    assert "--weights /path/to/resnet18-f37072fd.pth" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message


def test_extractor_normalises_uint8_crops_like_imagenet_preprocessing(reference):
    net, trunk, _ = reference
    net_trunk, _ = load_backbone("resnet18", "none")
    net_trunk.load_state_dict({k: v for k, v in net.state_dict().items()
                               if not k.startswith("fc.")})
    extractor = FeatureExtractor(net_trunk, torch.device("cpu"), out_dtype=torch.float32)
    crops = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(2))
    x = tvf.normalize(crops.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        expected = trunk(x)
    out = extractor(crops)
    assert out.dtype == torch.float32 and out.shape == (3, 512, 2, 2)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert extractor.output_shape(64) == (512, 2, 2)
    assert extractor.output_shape(224) == (512, 7, 7)
    half = FeatureExtractor(net_trunk, torch.device("cpu"))(crops)
    assert half.dtype == torch.float16
    np.testing.assert_allclose(half.float().numpy(), expected.numpy(), rtol=2e-3, atol=2e-3)
