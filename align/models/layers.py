"""Layer helpers every head shares, kept once: PyTorch's default init drawn from a seeded
generator, linear-interpolation weights (TTM's warp and SC's grid mask), the frame cosine
distance the heads score with, and the float32 floor for reductions under autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def interp_weights(pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation weights of fractional positions on ``length`` samples.

    ``pos`` (...,) in sample units (0 is the first sample); returns (..., length) with weight
    1 - frac on floor(pos) and frac on floor(pos) + 1, dropping samples outside [0, length)
    (zero padding). The gradient is the one-sided one of ``grid_sample``, also at integers.
    """
    base = pos.detach().floor()
    frac = (pos - base).unsqueeze(-1)  # (..., 1)
    k = torch.arange(length, device=pos.device, dtype=pos.dtype)  # (length,)
    lo = (k == base.unsqueeze(-1)).to(pos.dtype)  # (..., length)
    hi = (k == base.unsqueeze(-1) + 1).to(pos.dtype)  # (..., length)
    return lo * (1 - frac) + hi * frac


def reset_layer(layer: nn.Module, generator: torch.Generator | None = None) -> None:
    """PyTorch's default init of Conv/Linear (U(+-1/sqrt(fan_in)) for weight and bias), GRU
    (U(+-1/sqrt(hidden)) for every weight and bias), BatchNorm (1, 0, fresh running stats) and
    LayerNorm (1, 0), drawn from ``generator`` instead of the global RNG. Other modules are left
    alone (containers: call it on each of ``module.modules()``)."""
    if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
        fan_in = layer.weight[0].numel()
        bound = 1 / math.sqrt(fan_in)
        with torch.no_grad():
            layer.weight.uniform_(-bound, bound, generator=generator)
            if layer.bias is not None:
                layer.bias.uniform_(-bound, bound, generator=generator)
    elif isinstance(layer, nn.GRU):
        bound = 1 / math.sqrt(layer.hidden_size)
        with torch.no_grad():
            for weight in layer.parameters():
                weight.uniform_(-bound, bound, generator=generator)
    elif isinstance(layer, nn.BatchNorm2d | nn.BatchNorm3d | nn.LayerNorm):
        layer.reset_parameters()


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 or wider: means and norms under bf16 autocast lose the ranking."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def frame_cosine_distance(f_s: torch.Tensor, f_q: torch.Tensor) -> torch.Tensor:
    """sum_t (1 - cos(f_s[..., :, t], f_q[..., :, t])) for features (..., C, T) -> (...)."""
    cos = (F.normalize(f_s, dim=-2) * F.normalize(f_q, dim=-2)).sum(-2)  # (..., T)
    return (1 - cos).sum(-1)
