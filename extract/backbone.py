"""The torchvision ResNet trunk, and what every backbone shares: weights records, preprocessing,
and the runner that turns uint8 crops into maps.

``load_backbone(arch, weights)`` builds a torchvision ResNet (18/34/50/101/152) up to layer4 (no
avgpool, no fc) in eval mode with gradients off and loads ``weights``:

- ``"imagenet"`` (or ``"pretrained"``): torchvision's ImageNet weights (IMAGENET1K_V1, what
  ``pretrained=True`` gave the authors) through torchvision's own download and cache;
- a file: a plain state dict, a training checkpoint holding one under ``model`` or ``state_dict``,
  or a checkpoint of the authors' TA2N code (``model_state_dict`` with the backbone under
  ``resnet.`` or, when saved from DataParallel, ``resnet.module.``) - detected from the keys;
- ``"none"``: random initialisation (seeded), with a warning that the features mean nothing.

``WeightsInfo`` records what was loaded and two hashes (of the file, and of the loaded tensors),
stored in the cache attributes so that a resume with other weights is refused. A weights file
written by ``adapt-backbone`` has a sidecar ``<file>.json`` (its provenance: base classes, videos,
epochs, recipe, the file's sha256); ``read_provenance`` reads it when that sha256 matches, the
summary lands in the record (``provenance``), and ``check_not_adapted_on`` refuses to extract
val / test videos or classes that the backbone was trained on. ``Preprocessing``
is a backbone's input convention (mean, std, resize filter, native input size, crop fraction), read
from its library's config (``torchvision_preprocessing`` for these ResNets). ``FeatureExtractor``
runs any backbone module on a device: uint8 crops in, normalised with the backbone's mean / std,
(N, C, h, w) maps out, optionally average-pooled to a smaller grid; on CUDA in channels_last with
bf16 autocast, on CPU in float32. The registry of every backbone is ``extract.backbones``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torchvision
from torch import nn

from cache import UserError
from cache.datasets import DATASETS, video_family
from cache.torch_files import load_tensors

CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048,
            "resnet152": 2048}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRUNK_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
# Prefixes that wrap a backbone's keys in checkpoints (DataParallel, the authors' CNN, others).
TA2N_PREFIXES = ("resnet.module.", "resnet.")


# The spellings of a family's own published weights (torchvision's ImageNet, timm's, open_clip's).
PRETRAINED = ("imagenet", "pretrained")
RANDOM_INIT_WARNING = ("--weights none: the backbone is randomly initialised, its features are "
                       "meaningless (use it for trying the pipeline only)")


def random_init(seed: int) -> tuple[str, str, str, None, str]:
    """(source, description, format, sha256, warning) of ``--weights none``, the same record and
    warning in every backbone family."""
    return "none", f"random initialisation (seed {seed})", "random init", None, RANDOM_INIT_WARNING


@dataclass(frozen=True)
class WeightsInfo:
    """What was loaded into the backbone (stored as the cache attribute ``weights``)."""

    source: str  # "imagenet" (torchvision) | "pretrained" (timm, open_clip) | "file" | "none"
    description: str
    format: str
    sha256: str | None  # of the file the weights came from
    state_sha256: str  # of the loaded tensors: identical features <=> identical hash
    warning: str | None = None
    provenance: dict | None = None  # adapt-backbone's record of a file's training (its sidecar)

    def to_attrs(self) -> dict:
        record = asdict(self)
        record.pop("warning")
        return record

    def with_provenance(self, weights: str) -> WeightsInfo:
        """This record plus the provenance of the weights file ``weights``, if it has one."""
        if self.source != "file":
            return self
        meta, problem = read_provenance(weights, self.sha256)
        if problem:
            return replace(self, warning=problem)
        return replace(self, provenance=provenance_attrs(meta)) if meta else self


@dataclass(frozen=True)
class Preprocessing:
    """A backbone's input convention, from its library's config (stored in the cache attributes).

    Frames are resized to ``resize`` squared with ``interpolation`` (antialiased), centre-cropped
    to the image size, scaled to [0, 1] and normalised with ``mean`` / ``std``.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # torchvision InterpolationMode value: "bilinear", "bicubic", ...
    input_size: int  # the side the weights were trained at: the default --image-size
    crop_pct: float  # crop side / resize side: the default --resize is image size / crop_pct
    source: str  # where these values were read

    def resize_for(self, image_size: int) -> int:
        """The resize side whose centre crop of ``image_size`` keeps the library's crop fraction."""
        return max(image_size, round(image_size / self.crop_pct))

    def to_attrs(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


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


# ------------------------------------------------------------------------------ provenance
ADAPT_FORMAT = "ta2n-cache adapt-backbone"


def sidecar_path(weights: str | os.PathLike) -> str:
    """Where adapt-backbone writes a weights file's provenance: the file's path + ``.json``."""
    return f"{weights}.json"


def read_provenance(weights: str, sha256: str | None) -> tuple[dict | None, str | None]:
    """(the sidecar of weights file ``weights``, a problem to warn about): (None, None) when there
    is no adapt-backbone sidecar; a sidecar written for other bytes is reported, not trusted."""
    path = sidecar_path(weights)
    if not os.path.isfile(path):
        return None, None
    try:
        meta = json.loads(open(path).read())
    except (OSError, json.JSONDecodeError) as e:
        return None, f"{path} is not readable JSON ({type(e).__name__}); provenance not recorded"
    if not isinstance(meta, dict) or meta.get("format") != ADAPT_FORMAT:
        return None, None  # somebody else's JSON next to the file: not ours to judge
    if meta.get("weights_sha256") != sha256:
        return None, (f"{path} describes other weights (its sha256 differs from {weights}'s); "
                      "provenance not recorded")
    return meta, None


def provenance_attrs(meta: dict) -> dict:
    """What the cache attributes keep of a sidecar: everything but the long video list, which
    is summarised by its count and hash (the sidecar keeps the list)."""
    record = {k: v for k, v in meta.items() if k not in ("videos", "held_out_videos")}
    record["videos"] = len(meta.get("videos", []))
    record["held_out_videos"] = len(meta.get("held_out_videos", []))
    return record


def same_videos(meta: dict, dataset: str, root: str) -> bool:
    """Whether an adaptation's dataset holds the very videos of ``dataset`` under ``root``:
    the same named dataset (or one sharing its videos, such as SSv2's two split lists); for
    a dataset of the user's lists (custom) the same folder. The families are the dataset
    records' (cache/datasets.py)."""
    if video_family(meta["dataset"]) != video_family(dataset):
        return False
    return DATASETS[dataset].split_folder is not None \
        or os.path.abspath(meta.get("root", "")) == os.path.abspath(root)


def check_not_adapted_on(weights: str, info: WeightsInfo, dataset: str, root: str,
                         records) -> None:
    """Refuse to extract val / test videos or classes the backbone was adapted on: their
    features would not be few-shot any more."""
    if info.provenance is None:
        return
    meta, _ = read_provenance(weights, info.sha256)
    if meta is None or not same_videos(meta, dataset, root):
        return
    novel = [r for r in records if r.split != "train"]
    same = meta["dataset"] == dataset
    base = set(meta["base_classes"]) if same else set()

    def key(video_id: str) -> str:  # across SSv2's split lists only the file stem is shared
        return video_id if same else video_id.rsplit("/", 1)[-1]

    seen = {key(v) for v in meta["videos"] + meta.get("held_out_videos", [])}
    leaks = sorted({f"class {r.class_name}" for r in novel if r.class_name in base}
                   | {f"video {r.video_id}" for r in novel if key(r.video_id) in seen})
    if leaks:
        more = f" and {len(leaks) - 3} more" if len(leaks) > 3 else ""
        raise UserError(f"--weights {weights} was adapted on train data of {meta['dataset']} "
                        f"that this extraction has in val/test ({', '.join(leaks[:3])}{more}): "
                        "their features would not be few-shot; adapt on this split's train list")


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
        raise UserError(f"--weights {path}: no such file (use pretrained, none, or a file path)")
    return load_tensors(path, f"--weights {path}")


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
        arch: one of ``CHANNELS``.
        weights: "imagenet" (or "pretrained"), "none", or the path of a weights file.
        seed: seeds the random initialisation of ``weights="none"``.
    """
    with torch.random.fork_rng(devices=[]):  # the init draws from its own seeded generator
        torch.manual_seed(seed)
        trunk = ResNetTrunk(arch)
    warning = None
    if weights in PRETRAINED:
        state, description, sha = _imagenet_state(arch)
        _fit(trunk, state, "the ImageNet weights")
        source, fmt = "imagenet", "torchvision weights"
    elif weights == "none":
        source, description, fmt, sha, warning = random_init(seed)
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
    """Runs a backbone on ``device``: uint8 crops (N, 3, S, S) -> float maps (N, C, h, w), on CPU.

    Args:
        trunk: the frozen backbone: normalised (N, 3, S, S) -> (N, C, h, w).
        device: where to run it; CUDA runs channels_last under bf16 autocast (fp16 without bf16).
        out_dtype: dtype of the returned maps (the cache's), converted on the device.
        mean, std: the backbone's input normalisation (on the [0, 1] scale).
        pool_to: average-pool every map to pool_to x pool_to (adaptive, on the device), or None.
    """

    def __init__(self, trunk: nn.Module, device: torch.device,
                 out_dtype: torch.dtype = torch.float16, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 pool_to: int | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.out_dtype = out_dtype
        self.pool_to = pool_to
        self.trunk = trunk.to(self.device)
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest kernels
            self.trunk = self.trunk.to(memory_format=torch.channels_last)
            self.autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.autocast = None
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255

    def normalize(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 crops -> normalised float input on the device ([0, 1] scale folded in)."""
        if self.cuda:
            crops = crops.pin_memory().to(self.device, non_blocking=True)
        x = (crops.float() - self.mean) / self.std  # (N, 3, S, S)
        return x.contiguous(memory_format=torch.channels_last) if self.cuda else x

    @torch.inference_mode()
    def forward_input(self, x: torch.Tensor, pool: bool = True) -> torch.Tensor:
        """Normalised input (N, 3, S, S) on the device -> maps (N, C, h, w) in ``out_dtype``."""
        if self.autocast is not None:
            with torch.autocast("cuda", dtype=self.autocast):
                maps = self.trunk(x)  # (N, C, h, w)
        else:
            maps = self.trunk(x)  # (N, C, h, w)
        if pool and self.pool_to is not None:
            # in float32: averaging many bf16 activations in bf16 would lose their low bits
            maps = nn.functional.adaptive_avg_pool2d(maps.float(), self.pool_to)  # (N, C, p, p)
        return maps.to(self.out_dtype)

    def __call__(self, crops: np.ndarray | torch.Tensor, pool: bool = True) -> torch.Tensor:
        crops = torch.as_tensor(crops)
        return self.forward_input(self.normalize(crops), pool).cpu()  # (N, C, h, w)

    def output_shape(self, image_size: int, pool: bool = True) -> tuple[int, int, int]:
        """(C, h, w) of one frame's map (before pooling with ``pool=False``), from a forward pass
        on one blank frame."""
        maps = self(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8), pool)
        return tuple(int(v) for v in maps.shape[1:])
