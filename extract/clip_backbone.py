"""open_clip's image towers as frozen backbones: ``--backbone clip:<arch>/<pretrained-tag>``
(``clip:ViT-B-16/openai``, ``clip:ViT-B-16/laion2b_s34b_b88k``, ``clip:RN50/openai``).

What is stored: the visual tower's last-block map through its own ``forward_intermediates`` - for
a ViT the patch tokens after the final LayerNorm (``ln_post``) and **before the projection**
(``proj``), the class token dropped, laid out on the patch grid (768 x 14 x 14 for ViT-B/16 at
224 px); for a CLIP ResNet the layer4 map before the attention pool; for a timm tower the trunk's
normalised last map. Why before the projection: ``proj`` was trained for one purpose, mapping the
*pooled* class token into the joint image-text space; on patch tokens it is a fixed linear map
that can only drop information (768 -> 512 for ViT-B/16), while the TA2N heads start with learned
linear maps of their own (TC's and SC's Wk / Wq / Wv), which can learn it or something better.
The price is 1.5x the disk of the projected tokens.

Preprocessing: open_clip's defaults merged with the tag's config (mean, std, filter), at the
tower's image size; CLIP's eval transform resizes the short side to the crop size (crop fraction
1). The tag also decides QuickGELU (OpenAI's weights need it), for a ``--weights`` file too.
Weights: ``pretrained`` - the tag's file through open_clip's download and cache; a file - loaded
by open_clip (tensors only), position embeddings resized to the image size; ``none`` - seeded
random initialisation (``extract.backbones``, as for every family). Only the image tower is kept;
``adapt-backbone`` does not train it (an open_clip weights file holds both towers).

open_clip is imported inside the functions that need it: this module registers the family
whenever the registry is read (``--help`` included), and importing open_clip takes seconds.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import torch
from torch import nn

from cache import UserError
from extract.backbone import Preprocessing, file_sha256
from extract.backbones import BackboneFamily, BackboneSpec, Loaded, register, seeded


class ClipFeatures(nn.Module):
    """An open_clip image tower's last-block map: (N, 3, S, S) -> (N, C, h, w)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(x, indices=1, intermediates_only=True,
                                                normalize_intermediates=True)
        return out["image_intermediates"][-1]  # (N, C, h, w)


def split_name(spec: str) -> tuple[str, str | None]:
    """'ViT-B-16/openai' -> ('ViT-B-16', 'openai'); 'ViT-B-16' -> ('ViT-B-16', None)."""
    arch, _, tag = spec.partition("/")
    return arch, tag or None


def check_name(arch: str, tag: str | None) -> None:
    """A one-line error unless open_clip knows the architecture and the tag."""
    import open_clip

    if arch not in open_clip.list_models():
        raise UserError(f"open_clip has no model {arch!r} (open_clip.list_models() lists them)")
    if tag is not None and not open_clip.get_pretrained_cfg(arch, tag):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise UserError(f"open_clip has no pretrained tag {tag!r} for {arch} (tags: {tags})")


def _tag_cfg(arch: str, tag: str | None) -> dict:
    import open_clip

    return open_clip.get_pretrained_cfg(arch, tag) if tag else {}


def clip_preprocessing(arch: str, tag: str | None) -> Preprocessing:
    """open_clip's eval preprocessing for this architecture and tag."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = merge_preprocess_dict(asdict(PreprocessCfg()), _tag_cfg(arch, tag))
    size = open_clip.get_model_config(arch)["vision_cfg"].get("image_size", cfg["size"])
    size = size if isinstance(size, int) else int(size[-1])
    where = f"{arch}/{tag}" if tag else f"{arch} (no tag: open_clip's defaults)"
    return Preprocessing(tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"], size, 1.0,
                         f"open_clip preprocess_cfg of {where}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _create(arch: str, tag: str | None, checkpoint: str | None, image_size: int) -> nn.Module:
    """The image tower of open_clip ``arch``, with ``checkpoint`` loaded if given (its random
    init drawn from the current generator: callers seed it)."""
    import open_clip

    native = clip_preprocessing(arch, tag).input_size
    model = open_clip.create_model(
        arch, pretrained=checkpoint, pretrained_text=False,
        force_quick_gelu=bool(_tag_cfg(arch, tag).get("quick_gelu", False)),
        force_image_size=None if image_size == native else image_size)
    visual = model.visual
    if not hasattr(visual, "forward_intermediates"):
        raise UserError(f"open_clip's {arch} image tower has no forward_intermediates; "
                        "its maps cannot be read")
    return visual


def _pretrained_file(arch: str, tag: str | None) -> str:
    """The tag's weights file through open_clip's download and cache (a one-line error offline)."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    if tag is None:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise UserError(f"--weights pretrained needs a tag: clip:{arch}/<tag> (tags: {tags})")
    cfg = _tag_cfg(arch, tag)
    try:
        return download_pretrained(cfg)
    except Exception as e:  # hub and URL errors come in many types
        where = (f"Hugging Face hub {cfg['hf_hub']}" if cfg.get("hf_hub") else cfg.get("url"))
        raise UserError(
            f"could not get open_clip's {arch}/{tag} weights ({_first_line(e)}); they come from "
            f"{where}: download them on a machine with internet and pass --weights "
            "/path/to/the/file, or copy that machine's Hugging Face cache (~/.cache/huggingface, "
            "or $HF_HOME)") from None


def _create_loaded(spec: BackboneSpec, checkpoint: str, seed: int, image_size: int,
                   description: str) -> ClipFeatures:
    """The tower with ``checkpoint`` loaded; open_clip's many error types for an unfitting file
    become one line."""
    try:
        visual = seeded(seed, lambda: _create(spec.arch, spec.tag, checkpoint, image_size))
    except UserError:
        raise
    except Exception as e:  # open_clip raises several types for unfitting files
        raise UserError(f"{description} could not be loaded into open_clip {spec.arch} "
                        f"({_first_line(e)})") from None
    return ClipFeatures(visual)


class ClipFamily(BackboneFamily):
    """An open_clip image tower, ``clip:<arch>/<pretrained-tag>``: its last-block map."""

    library = "open_clip"
    prefix = "clip:"
    form = "clip:<arch>/<pretrained-tag>"
    about = ("an open_clip image tower, clip:<arch>/<pretrained-tag> (patch tokens before the "
             "projection)")
    feature = ("visual.forward_intermediates: last block after the final norm, before the "
               "projection (ViT: patch tokens, class token dropped; ResNet: layer4)")

    def parse(self, name: str) -> tuple[str, str | None]:
        arch, tag = split_name(name.removeprefix(self.prefix))
        check_name(arch, tag)
        return arch, tag

    def preprocessing(self, spec: BackboneSpec) -> Preprocessing:
        return clip_preprocessing(spec.arch, spec.tag)

    def build(self, spec: BackboneSpec, image_size: int) -> ClipFeatures:
        return ClipFeatures(_create(spec.arch, spec.tag, None, image_size))

    def load_pretrained(self, spec: BackboneSpec, seed: int, image_size: int) -> Loaded:
        checkpoint = _pretrained_file(spec.arch, spec.tag)
        where = f"open_clip {spec.arch}/{spec.tag}"
        description = f"{where} ({checkpoint})"
        features = _create_loaded(spec, checkpoint, seed, image_size, description)
        return Loaded(features, description, where, file_sha256(checkpoint))

    def load_file(self, spec: BackboneSpec, path: str, seed: int,
                  image_size: int) -> tuple[ClipFeatures, str]:
        checkpoint = os.path.abspath(path)
        return _create_loaded(spec, checkpoint, seed, image_size, checkpoint), \
            "open_clip checkpoint"


register(ClipFamily())
