"""The torchvision ResNets as a backbone family: ``--backbone resnet18 ... resnet152``, each up
to layer4 (no avgpool, no fc): (N, 3, S, S) -> (N, C, ceil(S/32), ceil(S/32)), C from
``CHANNELS``.

Weights (``extract.backbones`` handles ``none`` and the missing file for every family):

- ``pretrained`` (or ``imagenet``): torchvision's ImageNet weights (IMAGENET1K_V1, what
  ``pretrained=True`` gave the authors) through torchvision's own download and cache;
- a file: a plain state dict, a training checkpoint holding one under ``model`` or ``state_dict``,
  or a checkpoint of the authors' TA2N code (``model_state_dict`` with the backbone under
  ``resnet.`` or, when saved from DataParallel, ``resnet.module.``) - detected from the keys;
  a file made for another ResNet is refused with a hint naming the one it fits.

Preprocessing is the ImageNet weights' own ``transforms()`` (crop 224 of a 256 resize, bilinear,
ImageNet mean / std). ``adapt-backbone`` trains these trunks and exports them as complete
torchvision models (the base-class classifier as ``fc``, which loading ignores).
"""

from __future__ import annotations

import math
import os
import re
import urllib.error

import torch
import torchvision
from torch import nn

from cache import UserError
from cache.torch_files import load_tensors
from extract.backbone import Preprocessing, WeightsInfo, file_sha256
from extract.backbones import BackboneFamily, BackboneSpec, Loaded, register, seeded

CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048,
            "resnet152": 2048}
STRIDE = 32  # the layer4 map is ceil(S / STRIDE) squared for an S x S input
TRUNK_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
# Prefixes that wrap a backbone's keys in checkpoints (DataParallel, the authors' CNN, others).
TA2N_PREFIXES = ("resnet.module.", "resnet.")


def torchvision_preprocessing(arch: str) -> Preprocessing:
    """The ImageNet weights' own transforms (crop 224 of a 256 resize, bilinear, ImageNet stats)."""
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    transform = weights.transforms()
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    return Preprocessing(tuple(transform.mean), tuple(transform.std),
                         transform.interpolation.value, crop, crop / resize,
                         f"torchvision {type(weights).__name__}.IMAGENET1K_V1.transforms()")


class ResNetTrunk(nn.Module):
    """torchvision ResNet without avgpool and fc: (N, 3, S, S) -> (N, C, ceil(S/32), ceil(S/32)).

    Args:
        arch: one of ``CHANNELS``.
    """

    def __init__(self, arch: str = "resnet50"):
        super().__init__()
        if arch not in CHANNELS:
            raise UserError(f"unknown backbone {arch!r}; choose one of {', '.join(CHANNELS)}")
        net = getattr(torchvision.models, arch)(weights=None)
        for name in TRUNK_PARTS:  # same attribute names, so torchvision state dict keys fit as is
            setattr(self, name, getattr(net, name))
        self.arch = arch
        self.channels = CHANNELS[arch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, S/4, S/4)
        x = self.layer2(self.layer1(x))  # (N, C/4, S/8, S/8)
        return self.layer4(self.layer3(x))  # (N, C, S/32, S/32)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def unwrap_checkpoint(obj) -> tuple[dict, str]:
    """The backbone's state dict inside a loaded weights file, and the format it was found in."""
    if isinstance(obj, dict) and "model_state_dict" in obj:
        state = obj["model_state_dict"]
        for prefix in TA2N_PREFIXES:
            backbone = _strip(state, prefix)
            if backbone:
                return backbone, f"TA2N checkpoint (model_state_dict, '{prefix}' keys)"
        if _is_state_dict(state) and "conv1.weight" in _strip_module(state):
            return _strip_module(state), "checkpoint (model_state_dict)"
        raise UserError("the checkpoint has a model_state_dict but no backbone keys starting "
                        "with 'resnet.' or 'resnet.module.'")
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and _is_state_dict(obj.get(key)):
            return _strip_module(obj[key]), f"checkpoint ('{key}')"
    if _is_state_dict(obj):
        return _strip_module(obj), "state dict"
    raise UserError("the weights file holds neither a state dict nor a checkpoint with "
                    "'model', 'state_dict' or 'model_state_dict'")


def _strip_module(state: dict) -> dict:
    """Drop DataParallel's 'module.' prefix when every key has it."""
    if all(k.startswith("module.") for k in state):
        return _strip(state, "module.")
    return state


def guess_arch(state: dict) -> str | None:
    """The torchvision ResNet a state dict was made for, from its block layout."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"layer3\.(\d+)\.", k))}
    bottleneck = any(re.match(r"layer1\.0\.conv3\.", k) for k in state)
    depth = len(blocks)
    if bottleneck:
        return {6: "resnet50", 23: "resnet101", 36: "resnet152"}.get(depth)
    return {2: "resnet18", 6: "resnet34"}.get(depth)


def _fit(trunk: ResNetTrunk, state: dict, what: str) -> None:
    """Load ``state`` into the trunk, ignoring fc; a mismatch is the user's to fix."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        trunk.load_state_dict(state, strict=True)
    except RuntimeError as e:
        guess = guess_arch(state)
        hint = f" (it looks like {guess}: pass --backbone {guess})" \
            if guess not in (None, trunk.arch) else ""
        missing = [k for k in trunk.state_dict() if k not in state]
        detail = (f"{len(missing)} keys missing, e.g. {missing[:2]}" if missing
                  else str(e).strip().splitlines()[-1].strip())
        raise UserError(f"{what} do not fit {trunk.arch}{hint}: {detail}") from None


def _imagenet_state(arch: str) -> tuple[dict, str, str | None]:
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    filename = os.path.basename(weights.url)
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        reason = getattr(e, "reason", None) or str(e).strip().splitlines()[0]
        raise UserError(
            f"could not download the ImageNet weights for {arch} ({reason}); download "
            f"{weights.url} on a machine with internet and pass --weights /path/to/{filename}"
        ) from None
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    sha = file_sha256(cached) if os.path.isfile(cached) else None
    return state, f"torchvision {type(weights).__name__}.IMAGENET1K_V1 ({filename})", sha


class ResNetFamily(BackboneFamily):
    """torchvision's ResNets by plain name, their layer4 map."""

    library = "torchvision"
    names = tuple(CHANNELS)
    form = ", ".join(CHANNELS)
    feature = "layer4 output (before avgpool)"
    pretrained_source = "imagenet"
    adaptable = True

    def preprocessing(self, spec: BackboneSpec) -> Preprocessing:
        return torchvision_preprocessing(spec.arch)

    def shape(self, spec: BackboneSpec, image_size: int) -> tuple[int, int, int]:
        side = math.ceil(image_size / STRIDE)
        return CHANNELS[spec.arch], side, side

    def build(self, spec: BackboneSpec, image_size: int) -> ResNetTrunk:
        return ResNetTrunk(spec.arch)

    def load_pretrained(self, spec: BackboneSpec, seed: int, image_size: int) -> Loaded:
        trunk = seeded(seed, lambda: ResNetTrunk(spec.arch))
        state, description, sha = _imagenet_state(spec.arch)
        _fit(trunk, state, "the ImageNet weights")
        return Loaded(trunk, description, "torchvision weights", sha)

    def load_file(self, spec: BackboneSpec, path: str, seed: int,
                  image_size: int) -> tuple[ResNetTrunk, str]:
        trunk = seeded(seed, lambda: ResNetTrunk(spec.arch))
        state, fmt = unwrap_checkpoint(load_tensors(path, f"--weights {path}"))
        _fit(trunk, state, f"the weights in {path} ({fmt})")
        return trunk, fmt

    def exported_state(self, trunk: nn.Module, classifier: nn.Linear) -> dict:
        """The trunk's keys plus the base-class classifier as ``fc``: a complete torchvision
        model with K classes (loading ignores ``fc``)."""
        return {**trunk.state_dict(), "fc.weight": classifier.weight,
                "fc.bias": classifier.bias}


FAMILY = register(ResNetFamily())


def load_backbone(arch: str = "resnet50", weights: str = "imagenet",
                  seed: int = 0) -> tuple[ResNetTrunk, WeightsInfo]:
    """The frozen trunk of ``arch`` (eval mode, no gradients, on CPU) and its ``WeightsInfo``.

    Args:
        arch: one of ``CHANNELS``.
        weights: "imagenet" (or "pretrained"), "none", or the path of a weights file.
        seed: seeds the random initialisation.
    """
    return BackboneSpec(arch, FAMILY, arch).load(weights, seed, 224)
