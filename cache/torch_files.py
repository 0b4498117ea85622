"""Reading torch files (weights, checkpoints) without ever running code from them: every load is
``torch.load(weights_only=True)``, which unpickles tensors, containers and plain values only. The
one widening is numpy scalars and dtypes (training scripts often store ``np.float64`` metrics next
to their weights); they are data, not code. A file that needs anything else is refused in one
line - re-saving its state dict with ``torch.save`` makes it loadable. ``save_tensors`` is the
matching writer: atomic, and a disk that refuses the bytes is one line.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from cache.atomic import atomic_path
from cache.errors import UserError

_SCALAR = np.float64(0).__reduce__()[0]  # numpy's scalar reconstructor, under numpy 1 and 2
NUMPY_DATA = [_SCALAR, np.dtype, *{type(np.dtype(t)) for t in (
    np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8,
    np.bool_)}]


def load_tensors(path: str | os.PathLike, what: str, map_location="cpu"):
    """The object in torch file ``path`` (tensors, containers, plain values, numpy scalars).

    ``what`` names the file in messages (e.g. "--weights x.pt", "checkpoint runs/a/best.pt").
    A missing, truncated or foreign file, or one that would need arbitrary code to unpickle,
    raises ``UserError``; nothing in the file is executed.
    """
    if not os.path.isfile(path):
        raise UserError(f"{what}: no such file")
    try:
        with torch.serialization.safe_globals(NUMPY_DATA):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for damaged, foreign or unsafe files
        reason = _reason(str(exc)) or type(exc).__name__
        if "unsupported global" in reason.lower():  # the pickle names a callable: code would run
            raise UserError(f"{what}: holds Python objects beyond tensors and plain values, and "
                            f"this tool never unpickles code ({reason}); re-save just its state "
                            "dict with torch.save") from None
        raise UserError(f"{what}: not a readable torch file ({reason})") from None


def save_tensors(obj, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (temp file, then ``os.replace``). A disk
    that refuses the bytes (full, a file-size limit: torch says RuntimeError) is a one-line
    ``UserError``, and the previous file is kept."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except (OSError, RuntimeError) as exc:
            raise UserError(f"cannot write {path}: {_reason(str(exc)) or type(exc).__name__} "
                            "(disk full, or a file-size limit?); the previous file is kept"
                            ) from None


def _reason(text: str) -> str:
    """The informative line of torch's message (it wraps the cause in paragraphs of advice)."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return (useful or lines or [""])[0].removeprefix("WeightsUnpickler error: ")
