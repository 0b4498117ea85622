"""The backbone registry: every frozen image backbone ``extract`` can run, by family.

A family is one module declaring one ``BackboneFamily`` and registering it on import
(``register(MyFamily())`` at its end); ``BUILT_IN`` lists the modules this package ships:

    resnet18 ... resnet152          torchvision ResNets, layer4 map (extract.resnet_backbone)
    timm:<name>[.<tag>]             any timm model (extract.timm_backbone)
    clip:<arch>/<pretrained-tag>    an open_clip image tower (extract.clip_backbone)

A family recognises its names (plain ``names`` known up front, or a ``prefix``), checks them
against its library, reads its preprocessing without building anything, builds its module
and loads its own published weights or a weights file. What every family shares lives here,
once: ``parse_backbone`` (the one name check, its one-line error naming the accepted forms,
``accepted_forms``, and ``plain_names`` / ``prefixed_forms`` / ``adaptable_forms`` for the
--backbone help, all built from the registry) and ``BackboneSpec.load``
(``--weights none`` / ``pretrained`` / a file: the seeded random init with its warning, the
missing-file error, eval mode without gradients, the ``WeightsInfo`` record with its hashes and
provenance). ``Backbone.prepare`` is what a run uses: the spec, its sizes resolved, its weights
loaded, its ``FeatureExtractor`` on a device, and channels and grid read from one forward pass.
The family modules keep their libraries' imports inside their functions: timm and open_clip are
imported only when a name needs them (each takes seconds to import).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from cache import UserError
from extract.backbone import (
    FeatureExtractor,
    Preprocessing,
    WeightsInfo,
    file_sha256,
    state_sha256,
)

# The modules of the families this package ships; each registers itself when imported.
BUILT_IN = ("extract.resnet_backbone", "extract.timm_backbone", "extract.clip_backbone")
# The spellings of a family's own published weights (torchvision's ImageNet, timm's, open_clip's).
PRETRAINED = ("imagenet", "pretrained")
RANDOM_INIT_WARNING = ("--weights none: the backbone is randomly initialised, its features are "
                       "meaningless (use it for trying the pipeline only)")


@dataclass(frozen=True)
class Loaded:
    """A family's module with weights loaded, and where they came from (for ``WeightsInfo``)."""

    module: nn.Module
    description: str
    format: str
    sha256: str | None  # of the file the weights came from, where there is one


class BackboneFamily:
    """One library of backbones: how it recognises a --backbone name, reads its preprocessing,
    builds its module and loads weights. A subclass sets the attributes and the methods that
    raise ``NotImplementedError`` here, and its module calls ``register`` with an instance.

    Attributes:
        library: the name recorded in the cache attributes ("torchvision", "timm", ...).
        prefix: the --backbone prefix that selects the family ("timm:"); "" where it takes
            only the plain ``names``.
        names: plain --backbone names the family takes, known up front (the ResNets).
        form: the accepted form in words, for errors and help ("timm:<name>[.<tag>]").
        about: what the family is, one phrase for --help.
        feature: what the stored map is, in words (stored in the cache attributes).
        pretrained_source: ``WeightsInfo.source`` of the family's own published weights.
        adaptable: whether ``adapt-backbone`` can train it (then ``exported_state`` matters).
    """

    library: str
    prefix: str = ""
    names: tuple[str, ...] = ()
    form: str
    about: str = ""
    feature: str
    pretrained_source: str = "pretrained"
    adaptable: bool = False

    def takes(self, name: str) -> bool:
        """Whether ``name`` is one of this family's (not yet checked against the library)."""
        if name in self.names:
            return True
        return bool(self.prefix) and name.startswith(self.prefix) and name != self.prefix

    def parse(self, name: str) -> tuple[str, str | None]:
        """(arch, tag) of a name the family takes; a one-line ``UserError`` where its library
        does not know it."""
        return name.removeprefix(self.prefix), None

    def preprocessing(self, spec: BackboneSpec) -> Preprocessing:
        """The library's input convention for ``spec``, read without building it."""
        raise NotImplementedError

    def shape(self, spec: BackboneSpec, image_size: int) -> tuple[int, int, int] | None:
        """(C, h, w) of a frame's map where it is known before building (None: ask a forward
        pass)."""
        return None

    def build(self, spec: BackboneSpec, image_size: int) -> nn.Module:
        """The module with random weights drawn from the current generator (the caller seeds
        it): normalised (N, 3, S, S) -> (N, C, h, w)."""
        raise NotImplementedError

    def load_pretrained(self, spec: BackboneSpec, seed: int, image_size: int) -> Loaded:
        """The module with the library's own weights, through its download and cache (a
        one-line ``UserError`` saying where to put the file when offline)."""
        raise NotImplementedError

    def load_file(self, spec: BackboneSpec, path: str, seed: int,
                  image_size: int) -> tuple[nn.Module, str]:
        """The module with the weights of the existing file ``path`` (tensors only, nothing
        executed) and the format they were found in; a one-line ``UserError`` if they do not
        fit."""
        raise NotImplementedError

    def exported_state(self, trunk: nn.Module, classifier: nn.Linear) -> dict:
        """What ``adapt-backbone`` writes of a trained module: its state dict in the library's
        own key names (what ``load_file`` reads back)."""
        raise NotImplementedError


_FAMILIES: dict[str, BackboneFamily] = {}


def register(family: BackboneFamily) -> BackboneFamily:
    """Add ``family`` to the registry (its module calls this once, at import)."""
    for other in _FAMILIES.values():
        clash = set(family.names) & set(other.names) or (
            family.prefix and family.prefix == other.prefix)
        if other.library == family.library or clash:
            raise ValueError(f"backbone family {family.library!r} clashes with the registered "
                             f"{other.library!r}")
    _FAMILIES[family.library] = family
    return family


def unregister(library: str) -> None:
    """Remove a registered family (tests register families of their own)."""
    del _FAMILIES[library]


def families() -> tuple[BackboneFamily, ...]:
    """Every registered family, the built-in ones first."""
    for module in BUILT_IN:
        importlib.import_module(module)  # registers itself, once
    return tuple(_FAMILIES.values())


def accepted_forms() -> str:
    """The accepted --backbone forms, in one line."""
    return ", ".join(family.form for family in families())


def plain_names() -> str:
    """The plain --backbone names of every family, comma-separated."""
    return ", ".join(name for family in families() for name in family.names)


def prefixed_forms() -> str:
    """Each prefixed family as ``<prefix>... <what it is>``, for --help."""
    return "; ".join(f"{family.prefix}... {family.about}" for family in families()
                     if family.prefix)


def adaptable_forms() -> str:
    """The --backbone forms adapt-backbone trains, in one line."""
    forms = [family.form for family in families() if family.adaptable]
    return ", or ".join([", ".join(forms[:-1]), forms[-1]]) if len(forms) > 1 else forms[0]


@dataclass(frozen=True)
class BackboneSpec:
    """A validated --backbone name: its family, and what the family built it from."""

    name: str
    family: BackboneFamily
    arch: str
    tag: str | None = None

    @property
    def library(self) -> str:
        return self.family.library

    @property
    def feature(self) -> str:
        """What the stored map is, in words."""
        return self.family.feature

    def preprocessing(self) -> Preprocessing:
        """The library's input convention for this backbone (no weights needed)."""
        return self.family.preprocessing(self)

    def load(self, weights: str, seed: int, image_size: int) -> tuple[nn.Module, WeightsInfo]:
        """The frozen module (eval, no gradients, on the CPU) and a record of its weights (with
        adapt-backbone's provenance when a weights file has it).

        Args:
            weights: "pretrained" (or "imagenet"): the library's own; "none": random, seeded,
                with a warning; else the path of a weights file.
            seed: seeds the random initialisation (of every module built).
            image_size: the crop side, for modules built at a size (ViTs).
        """
        warning = None
        if weights == "none":
            module = seeded(seed, lambda: self.family.build(self, image_size))
            loaded = Loaded(module, f"random initialisation (seed {seed})", "random init", None)
            source, warning = "none", RANDOM_INIT_WARNING
        elif weights in PRETRAINED:
            loaded = self.family.load_pretrained(self, seed, image_size)
            source = self.family.pretrained_source
        else:
            if not os.path.isfile(weights):
                raise UserError(f"--weights {weights}: no such file (use pretrained, none, or a "
                                "file path)")
            module, fmt = self.family.load_file(self, weights, seed, image_size)
            loaded = Loaded(module, os.path.abspath(weights), fmt, file_sha256(weights))
            source = "file"
        module = loaded.module.eval().requires_grad_(False)
        info = WeightsInfo(source, loaded.description, loaded.format, loaded.sha256,
                           state_sha256(module), warning)
        return module, info.with_provenance(weights)

    def to_attrs(self) -> dict:
        return {"name": self.name, "library": self.library, "arch": self.arch, "tag": self.tag,
                "feature": self.feature}


def seeded(seed: int, build):
    """``build()`` with torch's generator seeded by ``seed``, the caller's left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def parse_backbone(name: str) -> BackboneSpec:
    """A --backbone value -> its spec: the one name check (every command calls it). A one-line
    UserError naming the accepted forms for a name no family takes; a family's own one-line
    error for a name its library does not know."""
    name = name.strip()
    for family in families():
        if family.takes(name):
            arch, tag = family.parse(name)
            return BackboneSpec(name, family, arch, tag)
    raise UserError(f"unknown backbone {name!r}; use one of {accepted_forms()}")


def check_adaptable(spec: BackboneSpec) -> None:
    """A one-line error unless adapt-backbone can train ``spec``'s family."""
    if not spec.family.adaptable:
        raise UserError(f"adapt-backbone trains {adaptable_forms()}, not {spec.library} "
                        f"backbones ({spec.name})")


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
        known = spec.family.shape(spec, image_size)
        if known:  # refused before any weights are downloaded or read
            check_pool_to(name, pool_to, known, image_size)
        trunk, info = spec.load(weights, seed, image_size)
        extractor = FeatureExtractor(trunk, device, out_dtype=getattr(torch, dtype),
                                     mean=prep.mean, std=prep.std, pool_to=pool_to)
        grid = extractor.output_shape(image_size, pool=False)
        check_pool_to(name, pool_to, grid, image_size)
        shape = extractor.output_shape(image_size) if pool_to else grid
        return cls(spec, prep, info, extractor, image_size, resize, grid, shape)


def check_pool_to(name: str, pool_to: int | None, grid: tuple[int, int, int],
                  image_size: int) -> None:
    """A one-line error if ``--pool-to`` asks for a larger grid than the (C, h, w) map has."""
    if pool_to and pool_to > min(grid[1:]):
        raise UserError(f"--pool-to {pool_to} is larger than {name}'s {grid[1]} x {grid[2]} "
                        f"map at --image-size {image_size}")
