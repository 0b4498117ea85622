"""What the learned Table 2 heads (TRN++, TARN, CMN, ARN, TRX) share, kept once: their own
hyperparameters as ``HeadConfig.options``, the checks of an episode's maps against what the
head was built for, seeded initialisation of every layer, per-frame features and ``explain``.

A head's options are declared on its class (``OPTIONS``) and are the keyword arguments of its
``__init__`` after the sizes (channels, frames, height, width, shot); each head stores the
resolved values in ``self.options`` (JSON values), so its config always records every
hyperparameter it was built with.
"""

from __future__ import annotations

import torch

from align.models.base import Head
from align.models.layers import at_least_fp32, reset_layer
from cache import UserError

SIZES = ("channels", "frames", "height", "width", "shot")


class LearnedHead(Head):
    """Base class of the heads whose hyperparameters live in ``HeadConfig.options``.

    A subclass sets ``kind`` and ``OPTIONS``, builds its layers in ``__init__`` (keyword
    options with the declared defaults, stored in ``self.options``), sets ``self.min_frames``
    and implements ``_run(support, query, way, shot, record)`` -> logits (M, way), filling
    ``record`` (a dict or None) with what ``explain`` returns.

    Args:
        channels: C of the maps.
        frames: T the head is built for.
        height: H the head is built for (recorded).
        width: W the head is built for (recorded).
        shot: K (recorded; the heads run on any K).
    """

    def __init__(self, channels: int = 2048, frames: int = 8, height: int = 7, width: int = 7,
                 shot: int = 1):
        super().__init__(channels, frames, height, width, shot)
        self.min_frames = 1

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's default init of every layer, drawn from ``generator``, then the head's own
        parameters (``_reset_own``)."""
        for layer in self.modules():
            reset_layer(layer, generator)
        self._reset_own(generator)

    def _reset_own(self, generator: torch.Generator | None) -> None:
        """Parameters that are not inside a standard layer; none by default."""

    def forward(self, support: torch.Tensor, query: torch.Tensor, way: int,
                shot: int) -> torch.Tensor:
        """Logits (M, way) for support (way*shot, C, T, H, W) and query (M, C, T, H, W)."""
        support, query = self._prepare(support, query, way, shot)
        return self._run(support, query, way, shot, None)

    @torch.no_grad()
    def explain(self, support: torch.Tensor, query: torch.Tensor, way: int, shot: int) -> dict:
        """The head's intermediates for one episode, in eval mode without gradients (the keys
        are listed in each head's ``_run``); always ``logits`` (M, N) and ``distances`` (N, M) =
        minus the logits, transposed, as the other heads report them."""
        was_training = self.training
        self.eval()
        try:
            record: dict = {}
            support, query = self._prepare(support, query, way, shot)
            logits = self._run(support, query, way, shot, record)
            record.update(logits=logits, distances=-logits.t())
        finally:
            self.train(was_training)
        return {key: value.detach() for key, value in record.items()}

    def _run(self, support: torch.Tensor, query: torch.Tensor, way: int, shot: int,
             record: dict | None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define _run")

    def _prepare(self, support: torch.Tensor, query: torch.Tensor, way: int, shot: int):
        """Checks an episode against the head and casts it to the head's dtype (float32 or
        wider: means and norms under bf16 autocast lose the ranking)."""
        self.check_episode(support, query, way, shot)
        channels, frames = support.shape[1:3]
        if channels != self.channels:
            raise UserError(f"this {self.kind} head was built for C={self.channels} maps, "
                            f"not C={channels}")
        if frames < self.min_frames:
            raise UserError(f"{self.kind} needs T >= {self.min_frames} frames; the maps have "
                            f"T={frames}")
        dtype = at_least_fp32(next(self.parameters(), support)).dtype
        return support.to(dtype), query.to(dtype)


def frame_features(maps: torch.Tensor) -> torch.Tensor:
    """Per-frame features (n, T, C): the spatial mean of maps (n, C, T, H, W), as the
    backbone's global average pool would give them."""
    return maps.mean((-2, -1)).transpose(1, 2)  # (n, T, C)


def positive_int(value, name: str, kind: str, least: int = 1) -> int:
    """``value`` as an int >= ``least``, or a UserError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value \
            or int(value) < least:
        raise UserError(f"{kind} option {name} must be an integer >= {least}, not {value!r}")
    return int(value)
