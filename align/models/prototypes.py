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
        channels, frames = support.shape[1:3]
        pooled = support.mean((-2, -1))  # (way*shot, C, T)
        keys = self.keynet(pooled).reshape(way, shot, channels, frames)  # (way, K, C, T)
        refs = self.querynet(pooled.view(way, shot, channels, frames)[:, 0])  # (way, C, T)
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
