"""Multi-shot prototypes (K > 1): each class's shots are aligned in time to its first shot and
averaged, with a second key / query / value set (Wk', Wq', Wv'); queries pass through Wv' too.

A_k[x, y] = softmax_x <Wk' G(shot_k)[:, x], Wq' G(ref)[:, y]> / sqrt(C), ref = the class's first
support video (the sampler's order within a class is random); aligned shot_k[:, y] =
sum_x A_k[x, y] (Wv' shot_k)[:, x] on the full map; prototype = mean over the K aligned shots.
With K = 1 the prototype is the support itself and Wv' is not used.

Wv' is a 1x1 projection, so it commutes with the time mixing and the mean: the fast form mixes
and averages the raw shots first and projects once per class instead of once per shot.
"""

from __future__ import annotations

import math

import torch

from align.models.acm import KeyQueryValue


class ShotAlignment(KeyQueryValue):
    """Builds (way, C, T, H, W) prototypes from class-major (way*shot, C, T, H, W) supports.

    Args:
        channels: C of the maps (Wk', Wq', Wv' are 1x1 Conv1d C -> C without bias).
        fast: project with Wv' after the shot mixing (exact, K times fewer projections).
    """

    def __init__(self, channels: int = 2048, fast: bool = True):
        super().__init__(channels)
        self.fast = fast

    def project(self, maps: torch.Tensor) -> torch.Tensor:
        """Wv' at every position of maps (n, C, T, H, W) -> (n, C, T, H, W), no residual."""
        return self.valuenet(maps.flatten(2)).view_as(maps)  # (n, C, T, H, W)

    def attention(self, support: torch.Tensor, way: int, shot: int) -> torch.Tensor:
        """A (way, shot, T_x, T_y): softmax over the shot's time x, per reference time y."""
        return self.attention_from_means(support.mean((-2, -1)), way, shot)  # (way, K, T, T)

    def attention_from_means(self, pooled: torch.Tensor, way: int, shot: int) -> torch.Tensor:
        """``attention`` from the shots' spatial means (way*shot, C, T)."""
        channels, frames = pooled.shape[1:]
        refs = self.querynet(pooled.view(way, shot, channels, frames)[:, 0])  # (way, C, T)
        return self.attention_from_keys(self.keynet(pooled), refs, way, shot)  # (way, K, T, T)

    def attention_from_keys(self, keys: torch.Tensor, refs: torch.Tensor, way: int,
                            shot: int) -> torch.Tensor:
        """``attention`` from Wk' of every shot's mean (way*shot, C, T) and Wq' of each class's
        reference (first) shot (way, C, T): both per video, so they can be precomputed."""
        channels, frames = keys.shape[1:]
        keys = keys.reshape(way, shot, channels, frames)  # (way, K, C, T)
        logits = torch.einsum("nkcx,ncy->nkxy", keys, refs) / math.sqrt(channels)  # (way,K,T,T)
        return logits.softmax(2)  # (way, K, T, T)

    def forward(self, support: torch.Tensor, way: int, shot: int):
        """Prototypes (way, C, T, H, W) and the shot attention (way, shot, T, T)."""
        attn = self.attention(support, way, shot)  # (way, K, T, T)
        shots = support.reshape(way, shot, *support.shape[1:])  # (way, K, C, T, H, W)
        if self.fast:
            mixed = torch.einsum("nkxy,nkcxhw->ncyhw", attn, shots) / shot  # (way, C, T, H, W)
            return self.project(mixed), attn  # (way, C, T, H, W)
        values = self.project(support).reshape(shots.shape)  # (way, K, C, T, H, W)
        aligned = torch.einsum("nkxy,nkcxhw->nkcyhw", attn, values)  # (way, K, C, T, H, W)
        return aligned.mean(1), attn  # (way, C, T, H, W)
