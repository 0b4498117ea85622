"""The backbone registry: every frozen image backbone ``extract`` can run, by name.

    resnet18 ... resnet152          torchvision ResNets, layer4 map (registered names)
    timm:<name>                     any timm model (extract.timm_backbone)
    clip:<arch>/<pretrained-tag>    an open_clip image tower (extract.clip_backbone)

``parse_backbone(name)`` validates a name (one-line error naming the accepted forms) and returns a
``BackboneSpec``: which library builds it (its constructor), its preprocessing (read from that
library's config, without building or downloading anything), and ``load`` -> the frozen module
(normalised (N, 3, S, S) -> (N, C, h, w)) and a ``WeightsInfo``. ``Backbone.prepare`` is what a
run uses: the spec, its sizes resolved, its weights loaded, its ``FeatureExtractor`` on a device,
and channels and grid read from one forward pass; for the registered ResNets they are also known
up front (``REGISTERED``), which the CLI help uses. timm and open_clip are imported only when a
name needs them (each takes seconds to import).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cache import UserError
from extract.backbone import (
    CHANNELS,
    FeatureExtractor,
    Preprocessing,
    WeightsInfo,
    load_backbone,
    torchvision_preprocessing,
)


@dataclass(frozen=True)
class Registered:
    """A backbone known by a plain name: its constructor's library, channels and grid rule."""

    library: str
    channels: int
    stride: int  # the map is ceil(S / stride) squared for an S x S input
    feature: str

    def grid(self, image_size: int) -> int:
        return math.ceil(image_size / self.stride)


REGISTERED = {arch: Registered("torchvision", channels, 32, "layer4 output (before avgpool)")
              for arch, channels in CHANNELS.items()}
PREFIXES = {
    "timm:": "any timm model, timm:<name>[.<tag>] (CNNs: last feature map; ViTs: patch tokens)",
    "clip:": "an open_clip image tower, clip:<arch>/<pretrained-tag> (patch tokens before the "
             "projection)",
}
FEATURES = {
    "timm": "forward_features: last feature map, or patch tokens (prefix tokens dropped) "
            "after the final norm",
    "open_clip": "visual.forward_intermediates: last block after the final norm, before the "
                 "projection (ViT: patch tokens, class token dropped; ResNet: layer4)",
}


def accepted_forms() -> str:
    """The accepted --backbone forms, in one line."""
    return f"{', '.join(REGISTERED)}, timm:<name>[.<tag>], clip:<arch>/<pretrained-tag>"


@dataclass(frozen=True)
class BackboneSpec:
    """A validated --backbone name: what builds it and how its input is prepared."""

    name: str
    library: str  # "torchvision" | "timm" | "open_clip"
    arch: str
    tag: str | None = None

    @property
    def feature(self) -> str:
        """What the stored map is, in words."""
        if self.library == "torchvision":
            return REGISTERED[self.arch].feature
        return FEATURES[self.library]

    def preprocessing(self) -> Preprocessing:
        """The library's input convention for this backbone (no weights needed)."""
        if self.library == "torchvision":
            return torchvision_preprocessing(self.arch)
        if self.library == "timm":
            from extract.timm_backbone import timm_preprocessing

            return timm_preprocessing(self.arch)
        from extract.clip_backbone import clip_preprocessing

        return clip_preprocessing(self.arch, self.tag)

    def load(self, weights: str, seed: int, image_size: int) -> tuple[nn.Module, WeightsInfo]:
        """The frozen module (eval, no gradients, on the CPU) and a record of its weights (with
        adapt-backbone's provenance when a weights file has it)."""
        if self.library == "torchvision":
            module, info = load_backbone(self.arch, weights, seed=seed)
        elif self.library == "timm":
            from extract.timm_backbone import load_timm

            module, info = load_timm(self.arch, weights, seed, image_size)
        else:
            from extract.clip_backbone import load_clip

            module, info = load_clip(self.arch, self.tag, weights, seed, image_size)
        return module, info.with_provenance(weights)

    def to_attrs(self) -> dict:
        return {"name": self.name, "library": self.library, "arch": self.arch, "tag": self.tag,
                "feature": self.feature}


def parse_backbone(name: str) -> BackboneSpec:
    """A --backbone value -> its spec; a one-line UserError naming the accepted forms if unknown.
    timm / open_clip names are checked against the libraries' own model lists."""
    name = name.strip()
    if name in REGISTERED:
        return BackboneSpec(name, "torchvision", name)
    if name.startswith("timm:") and name[5:]:
        from extract.timm_backbone import check_name

        check_name(name[5:])
        return BackboneSpec(name, "timm", name[5:])
    if name.startswith("clip:") and name[5:]:
        from extract.clip_backbone import check_name, split_name

        arch, tag = split_name(name[5:])
        check_name(arch, tag)
        return BackboneSpec(name, "open_clip", arch, tag)
    raise UserError(f"unknown backbone {name!r}; use one of {accepted_forms()}")


@dataclass
class Backbone:
    """The resolved backbone of a run: spec, sizes, preprocessing, weights, runner, map shapes."""

    spec: BackboneSpec
    preprocessing: Preprocessing
    weights: WeightsInfo
    extractor: FeatureExtractor
    image_size: int
    resize: int
    grid: tuple[int, int, int]  # (C, h, w) of a frame's map before pooling
    shape: tuple[int, int, int]  # (C, h, w) as stored

    @classmethod
    def prepare(cls, name: str, weights: str, seed: int, device: torch.device, *,
                image_size: int | None = None, resize: int | None = None,
                pool_to: int | None = None, dtype: str = "float16") -> Backbone:
        """Build backbone ``name`` on ``device``; sizes left None come from its preprocessing."""
        spec = parse_backbone(name)
        prep = spec.preprocessing()
        image_size = image_size or prep.input_size
        resize = resize or prep.resize_for(image_size)
        if image_size > resize:
            raise UserError(f"--image-size {image_size} is larger than --resize {resize}")
        trunk, info = spec.load(weights, seed, image_size)
        extractor = FeatureExtractor(trunk, device, out_dtype=getattr(torch, dtype),
                                     mean=prep.mean, std=prep.std, pool_to=pool_to)
        grid = extractor.output_shape(image_size, pool=False)
        if pool_to and pool_to > min(grid[1:]):
            raise UserError(f"--pool-to {pool_to} is larger than {name}'s {grid[1]} x {grid[2]} "
                            f"map at --image-size {image_size}")
        shape = extractor.output_shape(image_size) if pool_to else grid
        return cls(spec, prep, info, extractor, image_size, resize, grid, shape)
