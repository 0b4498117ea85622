"""What every backbone family shares: weights records, preprocessing, and the runner that turns
uint8 crops into maps.

``WeightsInfo`` records what was loaded and two hashes (of the file, and of the loaded tensors),
stored in the cache attributes so that a resume with other weights is refused. A weights file
written by ``adapt-backbone`` has a sidecar ``<file>.json`` (its provenance: base classes, videos,
epochs, recipe, the file's sha256); ``read_provenance`` reads it when that sha256 matches, the
summary lands in the record (``provenance``), and ``check_not_adapted_on`` refuses to extract
val / test videos or classes that the backbone was trained on. ``Preprocessing``
is a backbone's input convention (mean, std, resize filter, native input size, crop fraction), read
from its library's config by its family. ``FeatureExtractor``
runs any backbone module on a device: uint8 crops in, normalised with the backbone's mean / std,
(N, C, h, w) maps out, optionally average-pooled to a smaller grid; on CUDA in channels_last with
bf16 autocast, on CPU in float32. The registry of the families, and the one place that loads
``--weights`` for all of them, is ``extract.backbones``; the families are ``extract.*_backbone``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from cache import UserError
from cache.datasets import DATASETS, video_family

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
