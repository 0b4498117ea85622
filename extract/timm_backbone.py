"""timm image models as frozen backbones: ``--backbone timm:<name>`` (any timm model, with or
without a pretrained tag: ``timm:convnext_tiny``, ``timm:vit_small_patch16_224.augreg_in21k``).

What is stored is the model's ``forward_features`` output as a (C, h, w) map per frame:

- CNNs: the last feature map (NHWC models such as Swin, whose ``output_fmt`` says so, permuted);
- ViT-family models: the patch tokens after the final norm, the class / distillation / register
  tokens (``num_prefix_tokens``) dropped, reshaped to the patch grid.

Preprocessing (mean, std, filter, input size, crop fraction) comes from the model's pretrained
config, resolved by timm itself (``timm.data.resolve_data_config``). Models with a fixed input size
(ViTs) are built at the requested image size (``img_size=``); weights loaded through timm then have
their position embeddings resampled by the model's own checkpoint filter.

Weights (safetensors or torch files, tensors only): ``pretrained`` - timm's normal download and
cache (Hugging Face hub or URL), checked by building the model again from another seed (a tensor
that differs between the two builds was not loaded: one-line error); a file - read here
(``cache.torch_files``, nothing executed) through the model's own checkpoint filter, every tensor
required; ``none`` - seeded random initialisation (``extract.backbones``, as for every family).
``adapt-backbone`` trains these models and exports them in timm's own key names.

timm is imported inside the functions that need it: this module registers the family whenever
the registry is read (``--help`` included), and importing timm takes seconds.
"""

from __future__ import annotations

import math
import os
import sys

import torch
from torch import nn

from cache import UserError
from cache.torch_files import load_tensors
from extract.backbone import Preprocessing, file_sha256
from extract.backbones import BackboneFamily, BackboneSpec, Loaded, register, seeded


class TimmFeatures(nn.Module):
    """A timm model's ``forward_features`` as maps: (N, 3, S, S) -> (N, C, h, w)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_features(x)
        if out.ndim == 3:  # (N, prefix + h*w, C) tokens
            return tokens_to_map(out, self.prefix_tokens, x.shape[-2:])
        return out.permute(0, 3, 1, 2) if self.nhwc else out  # (N, C, h, w)


def tokens_to_map(tokens: torch.Tensor, prefix: int, image_hw) -> torch.Tensor:
    """(N, prefix + h*w, C) tokens -> (N, C, h, w) patch map, the grid's shape from the image's."""
    patches = tokens[:, prefix:]  # (N, h*w, C)
    count = patches.shape[1]
    height = round(math.sqrt(count * image_hw[0] / image_hw[1]))
    width = count // max(height, 1)
    if height * width != count:
        raise UserError(f"cannot lay {count} patch tokens out as a grid for a "
                        f"{image_hw[0]}x{image_hw[1]} input")
    n, _, c = patches.shape
    return patches.reshape(n, height, width, c).permute(0, 3, 1, 2)  # (N, C, h, w)


def check_name(name: str) -> None:
    """A one-line error unless timm knows ``name`` (architecture and, if given, its tag)."""
    import timm

    if not timm.is_model(name):
        raise UserError(f"timm has no model {name!r} (timm.list_models() lists them)")
    try:
        timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:
        raise UserError(f"timm:{name}: {e}") from None


def timm_preprocessing(name: str) -> Preprocessing:
    """The model's own data config (the pretrained tag's, or the architecture's default tag's)."""
    import timm.data

    cfg = timm.models.get_pretrained_cfg(name)
    data = timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict() if cfg else None)
    source = f"timm pretrained_cfg of {name}" + (f" ({cfg.tag})" if cfg and cfg.tag else "")
    return Preprocessing(tuple(data["mean"]), tuple(data["std"]), data["interpolation"],
                         int(data["input_size"][-1]), float(data["crop_pct"]), source)


def _create(name: str, image_size: int, **kwargs) -> nn.Module:
    """timm.create_model without a classifier, at ``image_size`` if the model needs to know it
    (its random init drawn from the current generator: callers seed it)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size and image_size != cfg.input_size[-1]:
        kwargs["img_size"] = image_size
    return timm.create_model(name, num_classes=0, **kwargs)


def _check_loaded(model: nn.Module, name: str, image_size: int, seed: int, what: str,
                  **kwargs) -> None:
    """A one-line error unless every random-initialised tensor of ``model`` came from the weights:
    one built from another seed must be identical."""
    other = seeded(seed + 1, lambda: _create(name, image_size, **kwargs)).state_dict()
    kept = [key for key, value in model.state_dict().items()
            if value.is_floating_point() and not torch.equal(value, other[key])]
    if kept:
        raise UserError(f"{what} do not fit timm {name}: {len(kept)} tensors were not in them "
                        f"and kept their random init, e.g. {kept[:3]}")


def _load_file_into(model: nn.Module, path: str, name: str) -> None:
    """Load a weights file into ``model`` ourselves (tensors only, nothing executed), through the
    model family's own ``checkpoint_filter_fn`` where it has one (a ViT's position embeddings
    resampled to the built image size): timm's own file route changed between releases (1.0.29
    refuses native PyTorch files for ViTs). Every tensor of the model must come from the file."""
    if path.endswith(".safetensors"):  # a format of tensors only, by design
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = load_tensors(path, f"--weights {path}")
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise UserError(f"--weights {path}: not a state dict (found {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    try:
        if filter_fn is not None:
            state = filter_fn(state, model)
        missing, _ = model.load_state_dict(state, strict=False)  # classifier keys: no head here
    except Exception as e:  # shape mismatches and foreign layouts are the user's to fix
        raise UserError(f"the weights in {path} do not fit timm {name} "
                        f"({_first_line(e)})") from None
    if missing:
        raise UserError(f"the weights in {path} do not fit timm {name}: {len(missing)} tensors "
                        f"were not in them and would keep their random init, e.g. "
                        f"{missing[:3]}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _pretrained_location(name: str) -> tuple[str, str | None]:
    """Where timm fetches the weights from (in words) and the cached file, if there is one."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return "nowhere (timm has no pretrained weights for it)", None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(cached, str):
                return f"Hugging Face hub {cfg.hf_hub_id}", cached
        return f"Hugging Face hub {cfg.hf_hub_id} (model.safetensors)", None
    url = cfg.url or ""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return url, cached if url and os.path.isfile(cached) else None


class TimmFamily(BackboneFamily):
    """Any timm model, ``timm:<name>[.<tag>]``: its ``forward_features`` as a map."""

    library = "timm"
    prefix = "timm:"
    form = "timm:<name>[.<tag>]"
    about = ("any timm model, timm:<name>[.<tag>] (CNNs: last feature map; ViTs: patch tokens)")
    feature = ("forward_features: last feature map, or patch tokens (prefix tokens dropped) "
               "after the final norm")
    adaptable = True

    def parse(self, name: str) -> tuple[str, None]:
        arch = name.removeprefix(self.prefix)
        check_name(arch)
        return arch, None

    def preprocessing(self, spec: BackboneSpec) -> Preprocessing:
        return timm_preprocessing(spec.arch)

    def build(self, spec: BackboneSpec, image_size: int) -> TimmFeatures:
        return TimmFeatures(_create(spec.arch, image_size, pretrained=False))

    def load_pretrained(self, spec: BackboneSpec, seed: int, image_size: int) -> Loaded:
        name = spec.arch
        where, _ = _pretrained_location(name)
        try:
            model = seeded(seed, lambda: _create(name, image_size, pretrained=True))
        except Exception as e:  # hub, URL and loading errors come in many types
            raise UserError(
                f"could not get timm's pretrained weights for {name} ({_first_line(e)}); they "
                f"come from {where}: download them on a machine with internet and pass "
                "--weights /path/to/the/file, or copy that machine's Hugging Face cache "
                "(~/.cache/huggingface, or $HF_HOME)") from None
        _check_loaded(model, name, image_size, seed, "timm's pretrained weights",
                      pretrained=True)
        _, cached = _pretrained_location(name)
        return Loaded(TimmFeatures(model), f"timm {name}" + (f" ({cached})" if cached else ""),
                      f"timm pretrained ({where})", file_sha256(cached) if cached else None)

    def load_file(self, spec: BackboneSpec, path: str, seed: int,
                  image_size: int) -> tuple[TimmFeatures, str]:
        model = seeded(seed, lambda: _create(spec.arch, image_size))
        _load_file_into(model, path, spec.arch)
        return TimmFeatures(model), "timm checkpoint"

    def exported_state(self, trunk: nn.Module, classifier: nn.Linear) -> dict:
        """The model's own keys (``TimmFeatures`` holds it as ``model``), no classifier."""
        return {k.removeprefix("model."): v for k, v in trunk.state_dict().items()}


register(TimmFamily())
