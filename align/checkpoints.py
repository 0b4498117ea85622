"""Head checkpoints: this project's format (``save_head`` / ``load_head``) and the checkpoints
written by the authors' TA2N training code, read into the same heads.

Loading never executes code from the file: ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from align.models import Head, HeadConfig, build_head_from_config
from cache import UserError
from cache.torch_files import load_tensors, save_tensors

CHECKPOINT_FORMAT = "ta2n-cache/head"
# 2: TRX's config records how it combines its cardinalities (``combine``), TARN's how it
# compares segments (``compare``); version 1 files were all written with the L2 norm and the
# product, and load with them (``upgrade_config``)
# 3: TA2N's switches (ttm, tc, sc, sc_mode, fast) are its head options; versions 1 and 2 kept
# them at the top level of every head's config (other heads recorded them as off)
CHECKPOINT_VERSION = 3
VERSION_1_OPTIONS = {"trx": {"combine": "norm"}, "tarn": {"compare": "mult"}}
TA2N_SWITCHES = ("ttm", "tc", "sc", "sc_mode", "fast")  # top-level keys before version 3
# What the authors' checkpoints do not record: the defaults of their 5-way 1-shot, 8-frame,
# ResNet-50-at-224 (7 x 7 maps) recipe, overridable in load_head.
AUTHORS_DEFAULTS = {"frames": 8, "height": 7, "width": 7, "shot": 1}


def save_head(head: Head, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write {format, version, config, state_dict, extra} to ``path`` atomically (temp file in
    the same folder, then ``os.replace``): a kill never leaves half a checkpoint."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": asdict(head.config),
        "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "extra": dict(extra or {}),
    }
    save_tensors(payload, path)


def load_head(path: str | os.PathLike, map_location="cpu", frames: int | None = None,
              shot: int | None = None, height: int | None = None,
              width: int | None = None) -> Head:
    """The head saved at ``path``, on ``map_location``, in eval mode.

    Reads this project's checkpoints (``save_head``) and the authors' TA2N checkpoints (a dict
    whose ``model_state_dict`` holds the head under ``align.``, or a bare state dict;
    ``module.`` prefixes are dropped). The authors' files record neither T, H, W nor K: C and
    the stages present come from the weights, ``frames``/``height``/``width``/``shot`` from the
    arguments (defaults 8, 7, 7, 1: their 5-way 1-shot ResNet-50 recipe). For this project's
    checkpoints the arguments, when given, override the stored config (``shot`` > 1 needs
    multi-shot weights in the file).
    """
    return load_head_checkpoint(path, map_location, frames=frames, shot=shot, height=height,
                                width=width)[0]


def load_head_checkpoint(path: str | os.PathLike, map_location="cpu", *,
                         frames: int | None = None, shot: int | None = None,
                         height: int | None = None, width: int | None = None):
    """(head, extra): ``load_head`` plus the checkpoint's ``extra`` dict (authors' files:
    {"source": "authors", "iteration": ...})."""
    ckpt = _read(path, map_location)
    overrides = {k: v for k, v in dict(frames=frames, shot=shot, height=height,
                                       width=width).items() if v is not None}
    ours = isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT
    if ours:
        stored = upgrade_config(ckpt["config"], ckpt.get("version", 1))
        cfg = HeadConfig.from_dict({**stored, **overrides})
        head = build_head_from_config(cfg)
        state, extra = ckpt["state_dict"], ckpt.get("extra", {})
    else:
        authors, inferred = _authors_state(ckpt, path)
        cfg = HeadConfig(**{**AUTHORS_DEFAULTS, **inferred, **overrides})
        head = build_head_from_config(cfg)
        state = _authors_to_ours(authors, head, path)
        extra = {"source": "authors"}
        if "iteration" in ckpt:
            extra["iteration"] = ckpt["iteration"]
    _check_finite(state, path)
    trained_shot = stored.get("shot") if ours else None
    if trained_shot not in (None, cfg.shot) and not any(k.startswith("shots.") for k in state) \
            and any(k.startswith("shots.") for k in head.state_dict()):
        # a 1-shot TA2N file holds no multi-shot weights: say so, not which keys are missing
        raise UserError(f"{path}: this checkpoint is {trained_shot}-shot and holds no "
                        f"{cfg.shot}-shot weights; use --shots {trained_shot} (or train with "
                        f"--shots {cfg.shot})")
    _load_state(head, state, path)
    if isinstance(map_location, str | torch.device):
        head = head.to(map_location)
    return head.eval(), extra


def upgrade_config(config: dict, version: int) -> dict:
    """A stored head config as this version's code reads it, so that an older checkpoint
    rebuilds the head it was trained as: a version-1 TRX combined its cardinalities by the
    L2 norm and a version-1 TARN compared segments by their product (the defaults then; the
    mean and the cosine + distance since version 2); before version 3 TA2N's switches were
    top-level keys of every head's config (TA2N's become its options, the others' go)."""
    options = config.get("options", {})
    if version >= 3 or not isinstance(options, dict):
        return config  # HeadConfig.from_dict says what is wrong, if anything
    then = VERSION_1_OPTIONS.get(config.get("kind"), {}) if version < 2 else {}
    if config.get("kind", "ta2n") == "ta2n":
        then = {**then, **{k: config[k] for k in TA2N_SWITCHES if k in config}}
    upgraded = {k: v for k, v in config.items() if k not in TA2N_SWITCHES}
    return {**upgraded, "options": {**then, **options}}


def _read(path, map_location):
    """The checkpoint's contents, loaded weights-only: nothing in the file is executed."""
    return load_tensors(path, f"checkpoint {path}", map_location)


def _check_finite(state: dict, path) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        more = " ..." if len(bad) > 1 else ""
        raise UserError(f"{path}: holds non-finite weights ({bad[0]}{more}): the training that "
                        "wrote it diverged")


def _load_state(head: Head, state: dict, path) -> None:
    """load_state_dict with one-line errors; multi-shot weights a 1-shot head lacks are
    dropped, and a missing SC step (authors' files) keeps its initial value."""
    if head.config.shot <= 1:  # only TA2N with K > 1 holds multi-shot weights
        state = {k: v for k, v in state.items() if not k.startswith("shots.")}
    try:
        missing, unexpected = head.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise UserError(f"{path}: weights do not fit the head: {exc}".splitlines()[0]) from exc
    missing = [k for k in missing if k != "sc.delta"]
    problems = [f"{what} {keys[:4]}{' ...' if len(keys) > 4 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if problems:
        raise UserError(f"{path}: weights do not match the head ({'; '.join(problems)})")


def _strip_module(key: str) -> str:
    return ".".join(part for part in key.split(".") if part != "module")


def _authors_state(ckpt, path) -> tuple[dict, dict]:
    """The authors' TA2N weights (keys without ``align.``) and the config they imply."""
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: not a head checkpoint (found {type(ckpt).__name__})")
    state = ckpt.get("model_state_dict", ckpt)
    if not isinstance(state, dict):
        raise UserError(f"{path}: model_state_dict is not a state dict")
    state = {_strip_module(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    head_keys = {k[len("align."):]: v for k, v in state.items() if k.startswith("align.")}
    if not head_keys:  # a bare TA2N state dict
        head_keys = {k: v for k, v in state.items()
                     if k.startswith(("firststage.", "secondstage.", "keynet_multi."))}
    if not head_keys:
        raise UserError(f"{path}: neither this project's head checkpoint nor an authors' TA2N "
                        "checkpoint (no 'align.' weights)")
    channels = None
    for key, axis, div in (("secondstage.keynet.weight", 0, 1), ("keynet_multi.weight", 0, 1),
                           ("firststage.locnet.0.weight", 1, 1),
                           ("secondstage.mvnet.0.weight", 1, 2)):
        if key in head_keys:
            channels = head_keys[key].shape[axis] // div
            break
    if channels is None:
        raise UserError(f"{path}: cannot tell the channel count C from the TA2N weights")
    stage2 = any(k.startswith("secondstage.") for k in head_keys)
    switches = dict(ttm=any(k.startswith("firststage.") for k in head_keys), tc=stage2,
                    sc=stage2, sc_mode="mask")
    inferred = dict(kind="ta2n", channels=channels, options=switches)
    return head_keys, inferred


def _authors_to_ours(state: dict, head: Head, path) -> dict:
    """Rename the authors' keys to this head's: firststage.locnet -> ttm.locnet,
    secondstage.{key,query,value}net -> tc.*, secondstage.mvnet -> sc.mvnet,
    {key,query,value}net_multi -> shots.*. Sequential indices are matched by the order of the
    layers that hold weights, so the layouts need not number their layers alike."""
    renamed = {}
    for name in ("keynet", "querynet", "valuenet"):
        for src, dst in ((f"secondstage.{name}.weight", f"tc.{name}.weight"),
                         (f"{name}_multi.weight", f"shots.{name}.weight")):
            if src in state:
                renamed[dst] = state[src]
    for src_prefix, dst_prefix, seq in (("firststage.locnet.", "ttm.locnet.", head.ttm),
                                        ("secondstage.mvnet.", "sc.mvnet.", head.sc)):
        layers = {}
        for key, value in state.items():
            if key.startswith(src_prefix):
                index, param = key[len(src_prefix):].split(".", 1)
                layers.setdefault(int(index), {})[param] = value
        if not layers:
            continue
        if seq is None:
            raise UserError(f"{path}: holds {src_prefix.rstrip('.')} weights but the head has "
                            "no such stage")
        seq = seq.locnet if dst_prefix.startswith("ttm") else seq.mvnet
        ours = [i for i, layer in enumerate(seq) if layer.state_dict()]
        if len(ours) != len(layers):
            raise UserError(f"{path}: {src_prefix.rstrip('.')} has {len(layers)} layers with "
                            f"weights, expected {len(ours)}")
        for mine, theirs in zip(ours, sorted(layers)):
            for param, value in layers[theirs].items():
                renamed[f"{dst_prefix}{mine}.{param}"] = value
    known = ("secondstage.keynet.", "secondstage.querynet.", "secondstage.valuenet.",
             "keynet_multi.", "querynet_multi.", "valuenet_multi.", "firststage.locnet.",
             "secondstage.mvnet.")
    stray = sorted(k for k in state if not k.startswith(known))
    if stray:
        raise UserError(f"{path}: unrecognised TA2N weights {stray[:4]}")
    return renamed
