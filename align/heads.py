"""The heads phase two trains and evaluates: TA2N (with its ablation switches), ProtoNet and
OTAM; building them from a config (one explicit dict, ``HEADS``), saving and loading them,
including checkpoints written by the authors' TA2N training code.

Every head is called as ``head(support, query, way, shot)``: support (way*shot, C, T, H, W)
class-major (class 0's shots, then class 1's ...), query (M, C, T, H, W); it returns logits
(M, way) = minus the distance of each query to each class. ``head.explain(...)`` returns the
intermediates (no grad, eval mode) for visualisation and analysis.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from align.acm import SC_MODES, SpatialCoordination, TemporalCoordination
from align.otam import LAMBDA, frame_distances, otam_distance
from align.prototypes import ShotAlignment
from align.ttm import TemporalTransform
from cache import UserError

CHECKPOINT_FORMAT = "ta2n-cache/head"
CHECKPOINT_VERSION = 1
SWITCHES = ("ttm", "tc", "sc", "sc_mode", "fast")
# What the authors' checkpoints do not record: the defaults of their 5-way 1-shot, 8-frame,
# ResNet-50-at-224 (7 x 7 maps) recipe, overridable in load_head.
AUTHORS_DEFAULTS = {"frames": 8, "height": 7, "width": 7, "shot": 1}


@dataclass
class HeadConfig:
    """How a head was built; stored as JSON with every checkpoint and run.

    ``ttm``, ``tc``, ``sc``, ``sc_mode`` and ``fast`` are TA2N's switches (baselines record
    them as off). ``frames``, ``height`` and ``width`` record the maps the head was built for;
    ``shot`` decides whether TA2N has the multi-shot prototype weights (shot > 1).
    """

    kind: str = "ta2n"
    channels: int = 2048
    frames: int = 8
    height: int = 7
    width: int = 7
    shot: int = 1
    ttm: bool = True
    tc: bool = True
    sc: bool = True
    sc_mode: str = "mask"
    fast: bool = True

    def validate(self) -> HeadConfig:
        if self.kind not in HEADS:
            raise UserError(f"unknown head {self.kind!r}; choose one of {sorted(HEADS)}")
        if self.sc_mode not in SC_MODES:
            raise UserError(f"unknown SC mode {self.sc_mode!r}; choose one of {list(SC_MODES)}")
        sizes = {k: getattr(self, k) for k in ("channels", "frames", "height", "width", "shot")}
        bad = {k: v for k, v in sizes.items() if int(v) < 1}
        if bad:
            raise UserError(f"head sizes must be positive: {bad}")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> HeadConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown head config keys {unknown}")
        return cls(**data).validate()


# ------------------------------------------------------------------------------ shared parts
def frame_cosine_distance(f_s: torch.Tensor, f_q: torch.Tensor) -> torch.Tensor:
    """sum_t (1 - cos(f_s[..., :, t], f_q[..., :, t])) for features (..., C, T) -> (...)."""
    cos = (F.normalize(f_s, dim=-2) * F.normalize(f_q, dim=-2)).sum(-2)  # (..., T)
    return (1 - cos).sum(-1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _Head(nn.Module):
    """What every head shares: the episode checks, ``decay``, ``trainable``, episode batches."""

    kind = ""

    def decay(self) -> None:
        """Halve TA2N's SC perturbation; nothing to do for heads without one."""

    @property
    def trainable(self) -> bool:
        """Whether the head has parameters to train (ProtoNet and OTAM have none)."""
        return any(p.requires_grad for p in self.parameters())

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Heads without parameters have nothing to initialise."""

    def forward_episodes(self, support: torch.Tensor, query: torch.Tensor, way: int,
                         shot: int) -> torch.Tensor:
        """Logits (E, M, way) of E episodes: support (E, way*shot, ...), query (E, M, ...)."""
        return torch.stack([self(s, q, way, shot) for s, q in zip(support, query)])

    def _check(self, support: torch.Tensor, query: torch.Tensor, way: int, shot: int) -> None:
        if support.dim() != 5 or query.dim() != 5:
            raise ValueError(f"maps must be (n, C, T, H, W); got support {tuple(support.shape)}"
                             f" and query {tuple(query.shape)}")
        if support.shape[0] != way * shot:
            raise ValueError(f"support holds {support.shape[0]} videos, not way*shot = "
                             f"{way}*{shot}")
        if support.shape[1:] != query.shape[1:]:
            raise ValueError(f"support {tuple(support.shape[1:])} and query "
                             f"{tuple(query.shape[1:])} maps differ in (C, T, H, W)")


# ------------------------------------------------------------------------------ TA2N
class TA2NHead(_Head):
    """TA2N: TTM per video, multi-shot prototypes, then TC and SC per (prototype, query) pair.

    Switching a stage off removes its weights; without SC the per-frame features are the spatial
    means of the maps that reach that point (Table 3's rows: none, TTM, TTM+TC, all, TC, TC+SC).

    Args:
        channels: C of the maps.
        frames: T the head is built for (recorded; the head runs on any T >= 4).
        height: H the head is built for (recorded).
        width: W the head is built for (recorded).
        shot: K; with K > 1 the head holds the multi-shot prototype weights (Wk', Wq', Wv').
        ttm: use the temporal transform module.
        tc: use ACM's temporal coordination.
        sc: use ACM's spatial coordination.
        sc_mode: "mask", "grid" or "enumerate" (Table 4).
        fast: the exact fast path (split first conv, einsum pooling, project-after-mix).
    """

    kind = "ta2n"

    def __init__(self, channels: int = 2048, frames: int = 8, height: int = 7, width: int = 7,
                 shot: int = 1, ttm: bool = True, tc: bool = True, sc: bool = True,
                 sc_mode: str = "mask", fast: bool = True):
        super().__init__()
        self.channels, self.frames, self.height, self.width = channels, frames, height, width
        self.shot, self.sc_mode, self.fast = shot, sc_mode, fast
        self.ttm = TemporalTransform(channels) if ttm else None
        self.shots = ShotAlignment(channels, fast) if shot > 1 else None
        self.tc = TemporalCoordination(channels) if tc else None
        self.sc = SpatialCoordination(channels, sc_mode, fast) if sc else None

    @property
    def config(self) -> HeadConfig:
        return HeadConfig(kind="ta2n", channels=self.channels, frames=self.frames,
                          height=self.height, width=self.width, shot=self.shot,
                          ttm=self.ttm is not None, tc=self.tc is not None,
                          sc=self.sc is not None, sc_mode=self.sc_mode, fast=self.fast)

    def set_fast(self, fast: bool) -> TA2NHead:
        """Switch between the fast path and the direct form (same weights, same results)."""
        self.fast = fast
        for part in (self.shots, self.sc):
            if part is not None:
                part.fast = fast
        return self

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for part in (self.ttm, self.shots, self.tc, self.sc):
            if part is not None:
                part.reset_parameters(generator)

    def decay(self) -> None:
        if self.sc is not None:
            self.sc.decay()

    def forward(self, support: torch.Tensor, query: torch.Tensor, way: int,
                shot: int) -> torch.Tensor:
        """Logits (M, way) for support (way*shot, C, T, H, W) and query (M, C, T, H, W)."""
        return self._run(support, query, way, shot, None)

    @torch.no_grad()
    def explain(self, support: torch.Tensor, query: torch.Tensor, way: int, shot: int) -> dict:
        """The intermediates of one episode, in eval mode without gradients (N = way).

        Keys (a stage switched off leaves its keys out):
            ttm_support (way*shot, 2), ttm_query (M, 2): TTM's (a, b) per video.
            shot_attention (N, K, T, T): multi-shot A_k[x, y] (K > 1 only).
            prototypes (N, T, C), queries (M, T, C): spatial means of the prototypes and
                queries after TTM and the multi-shot step, before ACM.
            tc_attention (N, M, T, T): TC's A[n, m][x (prototype time), y (query time)].
            sc_offsets (N, M, T, 2): SC's offsets (ox, oy) in grid units, unperturbed
                (enumerate: the chosen integer shifts).
            f_s, f_q (N, M, T, C): the final pair features.
            distances (N, M), logits (M, N).
        Tensors are detached, on the input's device.
        """
        was_training = self.training
        self.eval()
        try:
            record: dict = {}
            self._run(support, query, way, shot, record)
        finally:
            self.train(was_training)
        return record

    def _run(self, support: torch.Tensor, query: torch.Tensor, way: int, shot: int,
             record: dict | None) -> torch.Tensor:
        support, query = self._prepare(support, query, way, shot)
        rec = record if record is not None else {}
        if self.ttm is not None:
            # support and query go through the locnet separately, as in the authors' code
            # (BatchNorm's training statistics are per batch)
            support, rec["ttm_support"] = self.ttm(support)  # (way*shot, C, T, H, W), (., 2)
            query, rec["ttm_query"] = self.ttm(query)  # (M, C, T, H, W), (M, 2)
        if shot > 1:
            protos, rec["shot_attention"] = self.shots(support, way, shot)  # (N, C, T, H, W)
            query = self.shots.project(query)  # (M, C, T, H, W)
        else:
            protos = support  # (N, C, T, H, W)
        if record is not None:
            rec["prototypes"] = protos.mean((-2, -1)).transpose(1, 2)  # (N, T, C)
            rec["queries"] = query.mean((-2, -1)).transpose(1, 2)  # (M, T, C)
        tc = None
        if self.tc is not None:
            protos, tc, rec["tc_attention"] = self.tc(protos, query)  # tc (N, M, C, T)
        if self.sc is not None:
            f_s, f_q, rec["sc_offsets"] = self.sc(protos, query, tc)  # (N, M, C, T) x 2
        else:
            n, m = protos.shape[0], query.shape[0]
            f_s = protos.mean((-2, -1))[:, None].expand(n, m, -1, -1)  # (N, M, C, T)
            f_q = query.mean((-2, -1))[None].expand(n, m, -1, -1)  # (N, M, C, T)
            f_q = f_q if tc is None else f_q + tc
        distances = frame_cosine_distance(f_s, f_q)  # (N, M)
        logits = -distances.t()  # (M, N)
        if record is not None:
            rec.update(f_s=f_s.transpose(2, 3), f_q=f_q.transpose(2, 3), distances=distances,
                       logits=logits)
            for key, value in rec.items():
                rec[key] = value.detach()
        return logits

    def _prepare(self, support: torch.Tensor, query: torch.Tensor, way: int, shot: int):
        self._check(support, query, way, shot)
        channels, frames, height, width = support.shape[1:]
        if channels != self.channels:
            raise UserError(f"this head was built for C={self.channels} maps, not C={channels}")
        if (self.ttm is not None or self.sc is not None) and min(frames, height, width) < 4:
            raise UserError(f"TTM and SC need T, H, W >= 4; the maps are T={frames}, "
                            f"H={height}, W={width}")
        if shot > 1 and self.shots is None:
            raise UserError(f"this head was built for 1-shot episodes and has no multi-shot "
                            f"weights; build or load it with shot={shot}")
        dtype = next(self.parameters(), support).dtype
        return support.to(dtype), query.to(dtype)


# ------------------------------------------------------------------------------ baselines
class ProtoNetHead(_Head):
    """ProtoNet on frames: spatial mean per frame, prototype = mean over shots, distance =
    sum over frames of 1 - cos. No parameters: it evaluates without training.

    Args:
        channels: C of the maps (recorded).
        frames: T (recorded).
        height: H (recorded).
        width: W (recorded).
        shot: K (recorded).
    """

    kind = "protonet"

    def __init__(self, channels: int = 2048, frames: int = 8, height: int = 7, width: int = 7,
                 shot: int = 1):
        super().__init__()
        self.sizes = dict(channels=channels, frames=frames, height=height, width=width,
                          shot=shot)

    @property
    def config(self) -> HeadConfig:
        return HeadConfig(kind=self.kind, **self.sizes, ttm=False, tc=False, sc=False)

    def forward(self, support: torch.Tensor, query: torch.Tensor, way: int,
                shot: int) -> torch.Tensor:
        return self._run(support, query, way, shot, None)

    @torch.no_grad()
    def explain(self, support: torch.Tensor, query: torch.Tensor, way: int, shot: int) -> dict:
        """prototypes (N, T, C), queries (M, T, C), f_s / f_q (N, M, T, C), distances (N, M),
        logits (M, N)."""
        record: dict = {}
        self._run(support, query, way, shot, record)
        return record

    def _run(self, support, query, way, shot, record):
        self._check(support, query, way, shot)
        pooled = _at_least_fp32(support).mean((-2, -1))  # (way*shot, C, T)
        protos = pooled.reshape(way, shot, *pooled.shape[1:]).mean(1)  # (N, C, T)
        queries = _at_least_fp32(query).mean((-2, -1))  # (M, C, T)
        f_s = protos[:, None].expand(-1, queries.shape[0], -1, -1)  # (N, M, C, T)
        f_q = queries[None].expand(way, -1, -1, -1)  # (N, M, C, T)
        distances = frame_cosine_distance(f_s, f_q)  # (N, M)
        logits = -distances.t()  # (M, N)
        if record is not None:
            record.update(prototypes=protos.transpose(1, 2), queries=queries.transpose(1, 2),
                          f_s=f_s.transpose(2, 3), f_q=f_q.transpose(2, 3),
                          distances=distances, logits=logits)
        return logits


class OTAMHead(ProtoNetHead):
    """OTAM: per frame spatial means, both-direction soft-min ordered temporal alignment
    (lambda 0.1) of each query with each support video, averaged over a class's shots.
    Training-free on frozen maps.

    Args:
        channels: C of the maps (recorded).
        frames: T (recorded).
        height: H (recorded).
        width: W (recorded).
        shot: K (recorded).
        lam: the soft-min temperature.
    """

    kind = "otam"

    def __init__(self, channels: int = 2048, frames: int = 8, height: int = 7, width: int = 7,
                 shot: int = 1, lam: float = LAMBDA):
        super().__init__(channels, frames, height, width, shot)
        self.lam = lam

    @torch.no_grad()
    def explain(self, support: torch.Tensor, query: torch.Tensor, way: int, shot: int) -> dict:
        """frame_distances (M, way*shot, T_query, T_support), distances (N, M), logits (M, N)."""
        record: dict = {}
        self._run(support, query, way, shot, record)
        return record

    def _run(self, support, query, way, shot, record):
        self._check(support, query, way, shot)
        s = _at_least_fp32(support).mean((-2, -1))  # (way*shot, C, T)
        q = _at_least_fp32(query).mean((-2, -1))  # (M, C, T)
        per_video = otam_distance(q, s, self.lam)  # (M, way*shot)
        distances = per_video.reshape(-1, way, shot).mean(-1).t()  # (N, M)
        logits = -distances.t()  # (M, N)
        if record is not None:
            record.update(frame_distances=frame_distances(q, s), distances=distances,
                          logits=logits)
        return logits


HEADS = {"ta2n": TA2NHead, "protonet": ProtoNetHead, "otam": OTAMHead}


# ------------------------------------------------------------------------------ building
def build_head(kind: str = "ta2n", *, channels: int = 2048, frames: int = 8, height: int = 7,
               width: int = 7, shot: int = 1, seed: int = 0, **switches) -> nn.Module:
    """A fresh head of ``kind`` for (C, T, H, W) maps and ``shot``-shot episodes.

    ``switches`` are TA2N's (ttm, tc, sc, sc_mode, fast); baselines ignore them. Weights are
    initialised from ``seed`` (PyTorch's default init, drawn from its own generator).
    """
    unknown = sorted(set(switches) - set(SWITCHES))
    if unknown:
        raise UserError(f"unknown head switches {unknown}; known: {list(SWITCHES)}")
    if kind != "ta2n":
        switches = {}
    cfg = HeadConfig(kind=kind, channels=channels, frames=frames, height=height, width=width,
                     shot=shot, **switches)
    return build_head_from_config(cfg, seed=seed)


def build_head_from_config(cfg: HeadConfig, seed: int = 0) -> nn.Module:
    """The head a ``HeadConfig`` describes, initialised from ``seed``."""
    cfg.validate()
    sizes = dict(channels=cfg.channels, frames=cfg.frames, height=cfg.height, width=cfg.width,
                 shot=cfg.shot)
    if cfg.kind == "ta2n":
        head = TA2NHead(**sizes, ttm=cfg.ttm, tc=cfg.tc, sc=cfg.sc, sc_mode=cfg.sc_mode,
                        fast=cfg.fast)
    else:
        head = HEADS[cfg.kind](**sizes)
    head.reset_parameters(torch.Generator().manual_seed(seed))
    return head


# ------------------------------------------------------------------------------ checkpoints
def save_head(head: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_head(path: str | os.PathLike, map_location="cpu", frames: int | None = None,
              shot: int | None = None, height: int | None = None,
              width: int | None = None) -> nn.Module:
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
        cfg = HeadConfig.from_dict({**ckpt["config"], **overrides})
        head = build_head_from_config(cfg)
        state, extra = ckpt["state_dict"], ckpt.get("extra", {})
    else:
        authors, inferred = _authors_state(ckpt, path)
        cfg = HeadConfig(**{**AUTHORS_DEFAULTS, **inferred, **overrides}).validate()
        head = build_head_from_config(cfg)
        state = _authors_to_ours(authors, head, path)
        extra = {"source": "authors"}
        if "iteration" in ckpt:
            extra["iteration"] = ckpt["iteration"]
    _load_state(head, state, path)
    if isinstance(map_location, str | torch.device):
        head = head.to(map_location)
    return head.eval(), extra


def _read(path, map_location):
    if not Path(path).is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass  # this project's trainer keeps RNG states and histories in "extra"
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # any unreadable file is the user's to fix
        raise UserError(f"{path}: not a readable torch checkpoint ({exc})") from exc


def _load_state(head: nn.Module, state: dict, path) -> None:
    """load_state_dict with one-line errors; multi-shot weights a 1-shot head lacks are
    dropped, and a missing SC step (authors' files) keeps its initial value."""
    if getattr(head, "shots", None) is None:
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
    inferred = dict(kind="ta2n", channels=channels,
                    ttm=any(k.startswith("firststage.") for k in head_keys),
                    tc=stage2, sc=stage2, sc_mode="mask")
    return head_keys, inferred


def _authors_to_ours(state: dict, head: TA2NHead, path) -> dict:
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
