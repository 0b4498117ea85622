"""The head registry: one explicit dict from a head's name (``--head``) to its class. Adding a
head is one module under ``align/models/`` and one line here; the CLI's choices come from it.
"""

from __future__ import annotations

import torch

from align.models.arn import ARNHead
from align.models.base import Head, HeadConfig
from align.models.cmn import CMNHead
from align.models.learned import LearnedHead
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
SWITCHES = ("ttm", "tc", "sc", "sc_mode", "fast")  # TA2N's, in HeadConfig


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
               **switches) -> Head:
    """A fresh head of ``kind`` for (C, T, H, W) maps and ``shot``-shot episodes.

    ``switches`` are TA2N's (ttm, tc, sc, sc_mode, fast); other heads ignore them. ``options``
    are a head's own hyperparameters (``HeadConfig.options``; None: its defaults). Weights are
    initialised from ``seed`` (PyTorch's default init, drawn from its own generator).
    """
    unknown = sorted(set(switches) - set(SWITCHES))
    if unknown:
        raise UserError(f"unknown head switches {unknown}; known: {list(SWITCHES)}")
    if kind != "ta2n":
        switches = {}
    cfg = HeadConfig(kind=kind, channels=channels, frames=frames, height=height, width=width,
                     shot=shot, options=dict(options or {}), **switches)
    return build_head_from_config(cfg, seed=seed)


def build_head_from_config(cfg: HeadConfig, seed: int = 0) -> Head:
    """The head a ``HeadConfig`` describes, initialised from ``seed``."""
    cls = head_class(cfg.kind)
    if cfg.options and not issubclass(cls, LearnedHead):
        raise UserError(f"head {cfg.kind!r} takes no options; got {sorted(cfg.options)}")
    head = cls.from_config(cfg.validate())
    head.reset_parameters(torch.Generator().manual_seed(seed))
    return head
