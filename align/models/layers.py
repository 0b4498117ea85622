"""Layer helpers every head shares, kept once: PyTorch's default init drawn from a seeded
generator, linear-interpolation weights (TTM's warp and SC's grid mask), the frame cosine
distance the heads score with, and the float32 floor for reductions under autocast.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

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


def frame_cosine_distance(f_s: torch.Tensor, f_q: torch.Tensor,
                          channel_dim: int = -2) -> torch.Tensor:
    """sum_t (1 - cos(f_s[..., :, t], f_q[..., :, t])) for features (..., C, T) -> (...);
    ``channel_dim=-1`` for features (..., T, C)."""
    cos = (F.normalize(f_s, dim=channel_dim) * F.normalize(f_q, dim=channel_dim)).sum(
        channel_dim)  # (..., T)
    return (1 - cos).sum(-1)


# ------------------------------------------------------------------------------ temporal mixing
def mix_time(mix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply (n, T_out, T_in) mixing matrices along dim 2 of x (n, C, T_in, ...) -> (n, C,
    T_out, ...): a warp, a shot's attention, or both (a product of such matrices)."""
    flat = x.reshape(*x.shape[:3], -1)  # (n, C, T_in, rest)
    out = torch.einsum("nts,ncsk->nctk", mix.to(x.dtype), flat)  # (n, C, T_out, rest)
    return out.reshape(*out.shape[:3], *x.shape[3:])


def channel_linear(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 Conv1d (C -> C') applied to features (..., C, T) as one GEMM over all (..., T)
    columns -> (..., C', T) (a transposed view). Conv1d on short T (the frames) runs one
    skinny (C', C) x (C, T) product per row on the CPU, several times slower per FLOP."""
    out = F.linear(x.transpose(-1, -2), conv.weight.flatten(1), conv.bias)  # (..., T, C')
    return out.transpose(-1, -2)  # (..., C', T)


def mix_time_major(mix: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Mix the K shots of each group in time and lay the result out time-major.

    mix (B, K, T_out, T_in) (or None: the identity, K = 1), x (B*K, C, T_in, H, W) ->
    (B, T_out, C, H, W) contiguous: out[b, t] = sum_k sum_s mix[b, k, t, s] x[b*K + k, :, s].
    One (T_out, K*T_in) x (K*T_in, C*H*W) matmul per group; the one copy is of x, which
    carries no gradient in training (raw cached maps), so the backward pass only forms the
    (B, K, T, T) gradient of ``mix``. SC's pooling reads the time-major maps as views.
    """
    n, channels, frames = x.shape[:3]
    flat = x.transpose(1, 2).reshape(n, frames, -1)  # (B*K, T_in, C*H*W)
    if mix is None:
        return flat.view(n, frames, channels, *x.shape[3:])
    groups, shot, out_frames = mix.shape[:3]
    lhs = mix.to(x.dtype).transpose(1, 2).reshape(groups, out_frames, shot * frames)
    out = lhs @ flat.view(groups, shot * frames, -1)  # (B, T_out, C*H*W)
    return out.view(groups, out_frames, channels, *x.shape[3:])


def tap_convs(x: torch.Tensor, weight: torch.Tensor, keep: tuple[int, int] | None = None
              ) -> torch.Tensor:
    """The per-frame 2-D convolutions of a Conv3d kernel's three temporal taps.

    x (n, C, T, H, W), weight (O, C, 3, kh, kw) -> Z (n, 3, O, T, H', W') with Z[:, d] the
    spatial conv (padding 1) of tap d on every frame. A Conv3d (temporal padding 1) of any
    temporal mix M of x is then ``tap_mix(M, Z)``: the mix moves past the channel and spatial
    work. ``keep`` = (H', W') computes only the first H' x W' output positions.
    """
    taps = weight.permute(2, 0, 1, 3, 4).flatten(0, 1).unsqueeze(2)  # (3*O, C, 1, kh, kw)
    z = conv3d_kept(x, taps, None, (0, 1, 1), keep)  # (n, 3*O, T, H', W')
    return z.unflatten(1, (3, weight.shape[0]))  # (n, 3, O, T, H', W')


def shifted_taps(mix: torch.Tensor) -> torch.Tensor:
    """(…, T, T) mixing matrices -> (…, 3, T, T): row t of tap d is row t+d-1 (zero outside)."""
    frames = mix.shape[-2]
    padded = F.pad(mix, (0, 0, 1, 1))  # (..., T+2, T)
    return torch.stack([padded[..., d:d + frames, :] for d in range(3)], -3)  # (..., 3, T, T)


def tap_mix(mix: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
    """Conv3d output of a time-mixed input from its taps: out[t] = sum_d sum_s M[t+d-1, s] z_d[s].

    mix (n, T, T) or None (the identity: a plain temporal conv), z (n, 3, O, T, ...) ->
    (n, O, T, ...).
    """
    if mix is None:
        mix = torch.eye(z.shape[3], device=z.device, dtype=z.dtype).expand(z.shape[0], -1, -1)
    shifted = shifted_taps(mix.to(z.dtype))  # (n, 3, T, T)
    flat = z.reshape(*z.shape[:4], -1)  # (n, 3, O, T, rest)
    out = torch.einsum("ndts,ndosk->notk", shifted, flat)  # (n, O, T, rest)
    return out.reshape(*out.shape[:3], *z.shape[4:])


# ------------------------------------------------------------------------------ layer runners
def conv3d_kept(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int, int], keep: tuple[int, int] | None = None
                ) -> torch.Tensor:
    """F.conv3d(x, weight, bias, padding=padding), computing only the first ``keep`` = (H', W')
    spatial output positions (stride 1): the rows and columns a following pooling drops are
    never computed. ``keep`` None: all of them."""
    if keep is None or tuple(keep) == tuple(x.shape[-2:]):
        return F.conv3d(x, weight, bias, padding=padding)
    pt, ph, pw = padding
    kh, kw = weight.shape[-2:]
    padded = F.pad(x, (pw, pw, ph, ph))  # (n, C, T, H + 2ph, W + 2pw)
    padded = padded[..., :keep[0] + kh - 1, :keep[1] + kw - 1]
    return F.conv3d(padded, weight, bias, padding=(pt, 0, 0))  # (n, O, T, H', W')


def pooled_extent(pool: nn.Module, size: tuple[int, ...]) -> tuple[int, ...] | None:
    """The leading extent of each of the last len(size) dims that ``pool`` (a MaxPool3d of
    stride = kernel, no padding) reads; None for any other pooling."""
    if not isinstance(pool, nn.MaxPool3d) or pool.padding not in (0, (0, 0, 0)):
        return None
    kernel = _triple(pool.kernel_size)
    if _triple(pool.stride) != kernel or pool.ceil_mode:
        return None
    return tuple(k * (n // k) for k, n in zip(kernel[-len(size):], size))


def block_max_pool(pool: nn.MaxPool3d, x: torch.Tensor) -> torch.Tensor:
    """``pool(x)`` for a MaxPool3d of stride = kernel without padding or dilation, as the
    maximum of the windows' strided positions: the same values, 4x faster than max_pool3d on
    the CPU (which also computes the argmax indices). Without gradients only: with ties the two
    backward passes would route the gradient differently. Other poolings run as they are."""
    extent = pooled_extent(pool, tuple(x.shape[-3:]))
    if extent is None or min(extent) == 0 or _triple(pool.dilation) != (1, 1, 1) or \
            pool.return_indices or (torch.is_grad_enabled() and x.requires_grad):
        return pool(x)
    kt, kh, kw = _triple(pool.kernel_size)
    x = x[..., :extent[0], :extent[1], :extent[2]]
    out = None
    for dt, dh, dw in itertools.product(range(kt), range(kh), range(kw)):
        part = x[..., dt::kt, dh::kh, dw::kw]  # one position of every window
        out = part if out is None else torch.maximum(out, part)
    return out.contiguous()


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, tuple | list) else (v, v, v)


def batch_norm(bn: nn.BatchNorm3d, x: torch.Tensor, groups: int = 1,
               deferred: list | None = None) -> torch.Tensor:
    """``bn(x)`` where x stacks ``groups`` equal batches: in training each batch is normalised
    with its own statistics and the running statistics are updated once per batch in order,
    exactly as ``groups`` separate calls would; in eval the running statistics are used.

    ``deferred``: append the updates (``RunningUpdate``) there instead of applying them, for a
    caller that must interleave them with another call's (``apply_running_updates``).
    """
    if not bn.training or (groups == 1 and deferred is None):
        return bn(x)
    if bn.momentum is None or not bn.track_running_stats:
        raise ValueError("grouped batch norm needs a momentum and running statistics")
    # one native (fused) BatchNorm over G*C channels: each batch's channels are its own
    xg = at_least_fp32(x).unflatten(0, (groups, -1))  # (G, n, C, ...)
    channels = xg.shape[2]
    stacked = xg.transpose(0, 1).flatten(1, 2)  # (n, G*C, ...)
    stats = xg.new_zeros(2, groups * channels)  # this call's batch mean and unbiased var
    y = F.batch_norm(stacked, stats[0], stats[1], bn.weight.repeat(groups),
                     bn.bias.repeat(groups), training=True, momentum=1.0, eps=bn.eps)
    y = y.unflatten(1, (groups, channels)).transpose(0, 1)  # (G, n, C, ...)
    update = RunningUpdate(bn, stats[0].view(groups, channels), stats[1].view(groups, channels))
    if deferred is None:
        apply_running_updates([[update]], groups)
    else:
        deferred.append(update)
    return y.flatten(0, 1).to(x.dtype)  # (G*n, C, ...)


@dataclass
class RunningUpdate:
    """One BatchNorm's per-batch statistics (G, C), to fold into its running statistics."""

    bn: nn.BatchNorm3d
    mean: torch.Tensor
    var: torch.Tensor  # unbiased, as nn.BatchNorm3d keeps it


def apply_running_updates(calls: list[list[RunningUpdate]], groups: int) -> None:
    """Fold the statistics of ``groups`` batches into the running ones in the order of
    separate calls: batch 0 of every call in ``calls``, then batch 1 ..."""
    with torch.no_grad():
        for g in range(groups):
            for call in calls:
                for u in call:
                    u.bn.running_mean.lerp_(u.mean[g].to(u.bn.running_mean.dtype), u.bn.momentum)
                    u.bn.running_var.lerp_(u.var[g].to(u.bn.running_var.dtype), u.bn.momentum)
                    u.bn.num_batches_tracked.add_(1)


def run_layers(layers, x: torch.Tensor, groups: int = 1,
               deferred: list | None = None) -> torch.Tensor:
    """Run a Sequential's ``layers`` on x, which stacks ``groups`` batches (BatchNorm per
    batch in training, see ``batch_norm``; ``deferred`` too).

    With BatchNorm in eval mode (an affine map per channel) a 'same' Conv3d followed by it
    absorbs it (``fold_batch_norm``), and when a MaxPool that drops trailing rows / columns
    comes next, the conv computes only the positions the pooling reads. Both are exact.
    """
    layers = list(layers)
    i = 0
    while i < len(layers):
        layer = layers[i]
        after = layers[i + 1:i + 3]
        if isinstance(layer, nn.BatchNorm3d):
            x = batch_norm(layer, x, groups, deferred)
        elif isinstance(layer, nn.Conv3d) and _same_size(layer) and after and \
                isinstance(after[0], nn.BatchNorm3d) and not after[0].training:
            weight, bias = fold_batch_norm(layer.weight, layer.bias, after[0])
            keep = pooled_extent(after[1], tuple(x.shape[-2:])) if len(after) > 1 else None
            x = conv3d_kept(x, weight, bias, layer.padding, keep)
            i += 1  # the BatchNorm is inside the conv now
        elif isinstance(layer, nn.MaxPool3d):
            x = block_max_pool(layer, x)
        else:
            x = layer(x)
        i += 1
    return x


def batch_norm_affine(bn: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) (C,) of an eval-mode BatchNorm: bn(x) = scale * x + shift per channel."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C,)
    return scale, bn.bias - bn.running_mean * scale


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm3d):
    """Conv weight (O, ...) and bias (O,) that include an eval-mode BatchNorm after the conv."""
    scale, shift = batch_norm_affine(bn)
    folded = weight * scale.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype)
    return folded, shift if bias is None else bias * scale + shift


def _same_size(conv: nn.Conv3d) -> bool:
    """Stride 1 and 'same' padding: the output has the input's size."""
    return conv.stride == (1, 1, 1) and all(2 * p == k - 1 for p, k in
                                            zip(conv.padding, conv.kernel_size))
