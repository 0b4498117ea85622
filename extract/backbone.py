"""The frozen backbone: a torchvision ResNet up to layer4, its weights, and the input normalisation.

``load_backbone(arch, weights)`` builds the trunk (no avgpool, no fc) in eval mode with gradients
off and loads ``weights``:

- ``"imagenet"``: torchvision's ImageNet weights (IMAGENET1K_V1, what ``pretrained=True`` gave the
  authors) through torchvision's own download and cache;
- a file: a plain state dict, a training checkpoint holding one under ``model`` or ``state_dict``,
  or a checkpoint of the authors' TA2N code (``model_state_dict`` with the backbone under
  ``resnet.`` or, when saved from DataParallel, ``resnet.module.``) - detected from the keys;
- ``"none"``: random initialisation (seeded), with a warning that the features mean nothing.

``WeightsInfo`` records what was loaded and two hashes (of the file, and of the loaded tensors),
stored in the cache attributes so that a resume with other weights is refused.
``FeatureExtractor`` runs the trunk on a device: uint8 crops in, (N, C, h, w) maps out; on CUDA in
channels_last with bf16 autocast, on CPU in float32.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision
from torch import nn

from cache import UserError

CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRUNK_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
# Prefixes that wrap a backbone's keys in checkpoints (DataParallel, the authors' CNN, others).
TA2N_PREFIXES = ("resnet.module.", "resnet.")


@dataclass(frozen=True)
class WeightsInfo:
    """What was loaded into the backbone (stored as the cache attribute ``weights``)."""

    source: str  # "imagenet" | "file" | "none"
    description: str
    format: str
    sha256: str | None  # of the file the weights came from
    state_sha256: str  # of the loaded tensors: identical features <=> identical hash
    warning: str | None = None

    def to_attrs(self) -> dict:
        record = asdict(self)
        record.pop("warning")
        return record


class ResNetTrunk(nn.Module):
    """torchvision ResNet without avgpool and fc: (N, 3, S, S) -> (N, C, ceil(S/32), ceil(S/32)).

    Args:
        arch: "resnet18", "resnet34" or "resnet50".
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


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_sha256(module: nn.Module) -> str:
    """Hash of every parameter and buffer, by name: what the features actually depend on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------ weight files
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


def _load_file(path: str) -> object:
    if not os.path.isfile(path):
        raise UserError(f"--weights {path}: no such file (use imagenet, none, or a file path)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for foreign or unsafe files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--weights {path} could not be loaded as tensors only ({first_line}); if it holds "
            "other Python objects, re-save just its state dict with torch.save"
        ) from None


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


def load_backbone(arch: str = "resnet50", weights: str = "imagenet",
                  seed: int = 0) -> tuple[ResNetTrunk, WeightsInfo]:
    """The frozen trunk (eval mode, no gradients, on CPU) and a record of its weights.

    Args:
        arch: "resnet18", "resnet34" or "resnet50".
        weights: "imagenet", "none", or the path of a weights file.
        seed: seeds the random initialisation of ``weights="none"``.
    """
    with torch.random.fork_rng(devices=[]):  # the init draws from its own seeded generator
        torch.manual_seed(seed)
        trunk = ResNetTrunk(arch)
    warning = None
    if weights == "imagenet":
        state, description, sha = _imagenet_state(arch)
        _fit(trunk, state, "the ImageNet weights")
        source, fmt = "imagenet", "torchvision weights"
    elif weights == "none":
        source, fmt, sha = "none", "random init", None
        description = f"random initialisation (seed {seed})"
        warning = ("--weights none: the backbone is randomly initialised, its features are "
                   "meaningless (use it for trying the pipeline only)")
    else:
        state, fmt = unwrap_checkpoint(_load_file(weights))
        _fit(trunk, state, f"the weights in {weights} ({fmt})")
        source, sha = "file", file_sha256(weights)
        description = os.path.abspath(weights)
    trunk.eval().requires_grad_(False)
    info = WeightsInfo(source, description, fmt, sha, state_sha256(trunk), warning)
    return trunk, info


# ------------------------------------------------------------------------------ running it
class FeatureExtractor:
    """Runs the trunk on ``device``: uint8 crops (N, 3, S, S) -> float maps (N, C, h, w) on the CPU.

    Args:
        trunk: the frozen backbone.
        device: where to run it; CUDA runs channels_last under bf16 autocast (fp16 without bf16).
        out_dtype: dtype of the returned maps (the cache's), converted on the device.
    """

    def __init__(self, trunk: nn.Module, device: torch.device,
                 out_dtype: torch.dtype = torch.float16):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.out_dtype = out_dtype
        self.trunk = trunk.to(self.device)
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest kernels
            self.trunk = self.trunk.to(memory_format=torch.channels_last)
            self.autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.autocast = None
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255

    def normalize(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 crops -> ImageNet-normalised float input on the device ([0, 1] scale folded in)."""
        if self.cuda:
            crops = crops.pin_memory().to(self.device, non_blocking=True)
        x = (crops.float() - self.mean) / self.std  # (N, 3, S, S)
        return x.contiguous(memory_format=torch.channels_last) if self.cuda else x

    @torch.inference_mode()
    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input (N, 3, S, S) on the device -> maps (N, C, h, w) in ``out_dtype``."""
        if self.autocast is not None:
            with torch.autocast("cuda", dtype=self.autocast):
                maps = self.trunk(x)  # (N, C, h, w)
        else:
            maps = self.trunk(x)  # (N, C, h, w)
        return maps.to(self.out_dtype)

    def __call__(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        crops = torch.as_tensor(crops)
        return self.forward_input(self.normalize(crops)).cpu()  # (N, C, h, w)

    def output_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, h, w) of one frame's map, from a forward pass on one blank frame."""
        maps = self(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8))
        return tuple(int(v) for v in maps.shape[1:])
