"""The head registry: one explicit dict from a head's name (``--head``) to its class. Adding a
head is one module under ``align/models/`` and one line here; the CLI's choices come from it,
and a head's own options from its class's ``OPTIONS`` (``check_head_options``, ``describe_heads``).
"""

from __future__ import annotations

import torch

from align.models.arn import ARNHead
from align.models.base import Head, HeadConfig
from align.models.cmn import CMNHead
from align.models.otam import OTAMHead
from align.models.protonet import ProtoNetHead
from align.models.ta2n import TA2NHead
from align.models.tarn import TARNHead
from align.models.trn import TRNHead
from align.models.trx import TRXHead
from cache import UserError

HEADS: dict[str, type[Head]] = {
    "ta2n": TA2NHead,
    "protonet": ProtoNetHead,
    "otam": OTAMHead,
    "trn": TRNHead,  # TRN++ (Table 2)
    "tarn": TARNHead,
    "cmn": CMNHead,  # CMN-J (Table 2)
    "arn": ARNHead,
    "trx": TRXHead,
}


def head_names(training_free: bool | None = None) -> list[str]:
    """Registered names, optionally only those that need (False) or need no (True) training."""
    return [name for name, cls in HEADS.items()
            if training_free is None or cls.training_free == training_free]


def head_class(kind: str) -> type[Head]:
    if kind not in HEADS:
        raise UserError(f"unknown head {kind!r}; choose one of {sorted(HEADS)}")
    return HEADS[kind]


def build_head(kind: str = "ta2n", *, channels: int = 2048, frames: int = 8, height: int = 7,
               width: int = 7, shot: int = 1, seed: int = 0, options: dict | None = None,
               **more_options) -> Head:
    """A fresh head of ``kind`` for (C, T, H, W) maps and ``shot``-shot episodes.

    ``options`` and ``more_options`` (keywords, e.g. ``sc=False``) are the head's own
    hyperparameters (its ``OPTIONS``; a missing one takes its default; an unknown one is a
    one-line error). Weights are initialised from ``seed`` (PyTorch's default init, drawn from
    its own generator).
    """
    cfg = HeadConfig(kind=kind, channels=channels, frames=frames, height=height, width=width,
                     shot=shot, options={**(options or {}), **more_options})
    return build_head_from_config(cfg, seed=seed)


def build_head_from_config(cfg: HeadConfig, seed: int = 0) -> Head:
    """The head a ``HeadConfig`` describes, initialised from ``seed``."""
    head = head_class(cfg.kind).from_config(cfg.validate())
    head.reset_parameters(torch.Generator().manual_seed(seed))
    return head


def check_head_options(kind: str, options: dict, parse_text: bool = False) -> dict:
    """``options`` checked against head ``kind``'s declared options (``Head.check_options``)."""
    return head_class(kind).check_options(options, parse_text)


def describe_heads() -> str:
    """Every registered head with its options and their defaults (``cli.py heads``)."""
    lines = []
    for name, cls in HEADS.items():
        lines.append(f"{name}{' (training-free)' if cls.training_free else ''}")
        lines += [f"  {option.describe()}" for option in cls.OPTIONS] or ["  (no options)"]
    return "\n".join(lines)
