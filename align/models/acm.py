"""ACM, the action coordination module: temporal coordination (TC) and spatial coordination (SC)
of every (prototype n, query m) pair, with SC's three variants (mask, grid, enumerate).

TC: attention of prototype time x over query time y on spatial means G (C, T); the query of a
pair gets the attended values as a residual broadcast over H, W; the prototype gets Wv G(s).
Because that residual is constant over H, W, a pair's query map is never stored: TC returns the
(N, M, C, T) term ``tc`` and the pair map is q~[n, m] = q_m + tc[n, m] broadcast.

SC: an offset o[t] = (ox, oy) per frame and pair, in grid units where the map spans [-1, 1]
(first component along W), predicted from the channel concatenation [s~_n ; q~[n, m]]. The
prototype is pooled with the normalised mask of +o, the query with that of -o. In training the
mask is the mean of the masks of 9 perturbed offsets o + delta*d; ``decay()`` halves delta.

Speed (``fast=True``): the predictor's first conv is linear in its input, so it runs on the
prototypes' half once per prototype, on the queries' half once per query, and on the TC term
(constant over H, W) with kernels summed over the taps that read inside the map: one summed
kernel per corner / edge / interior case of the zero padding (the 3 x 3 map of cases), applied
as a temporal conv, then copied to the cases' positions. This is exact. The masked pooling is an
einsum against the un-broadcast maps, so no (N, M, C, T, H, W) tensor is ever built.
``fast=False`` is the direct form of the authors' code (cat, conv, broadcast, sum).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from align.models.layers import at_least_fp32, interp_weights, reset_layer

SC_MODES = ("mask", "grid", "enumerate")
PERTURBATIONS = ((0, 0), (0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1))
# Which of a 3-tap kernel's taps read inside the map for the first row, the interior rows and
# the last row (zero padding 1): the three cases per axis of the fast path's 3 x 3 map.
REGION_TAPS = ((0.0, 1.0, 1.0), (1.0, 1.0, 1.0), (1.0, 1.0, 0.0))


# ------------------------------------------------------------------------------ TC
class KeyQueryValue(nn.Module):
    """Wk, Wq, Wv: three 1x1 Conv1d C -> C without bias (TC's set, and the multi-shot set).

    The attribute names are the authors' (``keynet``, ``querynet``, ``valuenet``), so their
    checkpoints map onto these modules key for key.

    Args:
        channels: C of the maps.
    """

    def __init__(self, channels: int = 2048):
        super().__init__()
        self.keynet = nn.Conv1d(channels, channels, 1, bias=False)
        self.querynet = nn.Conv1d(channels, channels, 1, bias=False)
        self.valuenet = nn.Conv1d(channels, channels, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for layer in (self.keynet, self.querynet, self.valuenet):
            reset_layer(layer, generator)


class TemporalCoordination(KeyQueryValue):
    """TC: A[n,m][x, y] = softmax_y <Wk G(s_n)[:, x], Wq G(q_m)[:, y]> / sqrt(C).

    Args:
        channels: C of the maps (Wk, Wq, Wv are 1x1 Conv1d C -> C without bias).
    """

    def forward(self, support: torch.Tensor, query: torch.Tensor):
        """Returns s~ (N, C, T, H, W), the pair term tc (N, M, C, T), the attention (N, M, T, T).

        The pair's query map is q~[n, m] = query[m] + tc[n, m] broadcast over H, W.
        """
        channels = support.shape[1]
        g_s = support.mean((-2, -1))  # (N, C, T)
        g_q = query.mean((-2, -1))  # (M, C, T)
        keys = self.keynet(g_s)  # (N, C, T)
        queries = self.querynet(g_q)  # (M, C, T)
        logits = torch.einsum("ncx,mcy->nmxy", keys, queries) / math.sqrt(channels)  # (N, M, T, T)
        attention = logits.softmax(-1)  # (N, M, T, T) over query time y
        values = self.valuenet(g_q)  # (M, C, T)
        tc = torch.einsum("nmxy,mcy->nmcx", attention, values)  # (N, M, C, T)
        support_t = support + self.valuenet(g_s)[..., None, None]  # (N, C, T, H, W)
        return support_t, tc, attention


# ------------------------------------------------------------------------------ masks
def axis_weights(offset: torch.Tensor, length: int) -> torch.Tensor:
    """Un-normalised mask weights along one axis: (...,) offsets -> (..., length).

    g_i = -1 + 2i/(L-1) + o; weight 1 where -1 < g_i < 1, else max(0, 1 - (|g_i| - 1)(L-1)/2).
    """
    i = torch.arange(length, device=offset.device, dtype=offset.dtype)  # (L,)
    g = -1 + 2 * i / (length - 1) + offset.unsqueeze(-1)  # (..., L)
    inside = (g > -1) & (g < 1)  # (..., L)
    ramp = F.relu(1 - (g.abs() - 1) * ((length - 1) / 2))  # (..., L)
    return torch.where(inside, torch.ones_like(g), ramp)


def offset_mask(offsets: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised masks (..., H, W) of offsets (..., 2) = (ox along W, oy along H); sum 1.

    The mask is the outer product of two axis weightings, so each is normalised on its own;
    on a square map both axes are one call (fewer small ops: each costs a thread wake-up)."""
    offsets = at_least_fp32(offsets)
    if height == width:
        both = axis_weights(offsets, width)  # (..., 2, W)
        both = both / both.sum(-1, keepdim=True)  # (..., 2, W)
        w_x, w_y = both.unbind(-2)  # (..., W) each
    else:
        w_x = axis_weights(offsets[..., 0], width)  # (..., W)
        w_y = axis_weights(offsets[..., 1], height)  # (..., H)
        w_x, w_y = (w / w.sum(-1, keepdim=True) for w in (w_x, w_y))
    return w_y.unsqueeze(-1) * w_x.unsqueeze(-2)  # (..., H, W)


def grid_axis_weights(offset: torch.Tensor, length: int) -> torch.Tensor:
    """Grid variant along one axis: (...,) -> (..., length), summing to 1.

    ``length`` points evenly spanning the overlap {x : x + o in [-1, 1]} of the map shifted by
    +o are resampled bilinearly and averaged; the average is a weighting of the map's samples.
    """
    lo = torch.clamp(-1 - offset, min=-1.0)  # (...,)
    hi = torch.clamp(1 - offset, max=1.0)  # (...,)
    steps = torch.linspace(0, 1, length, device=offset.device, dtype=offset.dtype)  # (L,)
    points = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * steps  # (..., L) grid units
    weights = interp_weights((points + 1) * ((length - 1) / 2), length).mean(-2)  # (..., L)
    return weights / weights.sum(-1, keepdim=True)


def grid_mask(offsets: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised grid-variant weights (..., H, W) of offsets (..., 2)."""
    offsets = at_least_fp32(offsets)
    w_x = grid_axis_weights(offsets[..., 0], width)  # (..., W)
    w_y = grid_axis_weights(offsets[..., 1], height)  # (..., H)
    return w_y.unsqueeze(-1) * w_x.unsqueeze(-2)  # (..., H, W)


def integer_offsets(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Every integer pixel shift with a non-empty overlap, in grid units: (S, 2) (ox, oy)."""
    dx = torch.arange(-(width - 1), width, device=device, dtype=dtype) * (2 / (width - 1))
    dy = torch.arange(-(height - 1), height, device=device, dtype=dtype) * (2 / (height - 1))
    oy, ox = torch.meshgrid(dy, dx, indexing="ij")  # (2H-1, 2W-1)
    return torch.stack([ox.flatten(), oy.flatten()], -1)  # (S, 2)


# ------------------------------------------------------------------------------ SC
class SpatialCoordination(nn.Module):
    """SC: per-frame offsets for every pair, then masked pooling to pair features (N, M, C, T).

    The offset predictor (``mvnet``, the authors' layer order): Conv3d(2C -> 128, k3, pad 1), BN,
    MaxPool3d((1, 2, 2)), ReLU, Conv3d(128 -> 128, k3, pad 1), BN, MaxPool3d((1, 2, 2)), ReLU,
    max over H, W, Flatten, Conv1d(128 -> 64, k1), ReLU, Conv1d(64 -> 2, k1), Tanh; times 0.75.
    The last Conv1d starts at zero, so offsets start at 0.

    Args:
        channels: C of the maps (the predictor reads 2C).
        mode: "mask" (default), "grid" (bilinear resampling of the overlap) or "enumerate"
            (no predictor: every integer shift, keeping the smallest distance per frame).
        fast: split first conv and einsum pooling (exact); False runs the direct form.
        hidden: channels of the predictor's Conv3d layers.
        fc: width of the predictor's hidden Conv1d.
        scale: the offsets' range (tanh times ``scale``).
        delta: initial perturbation step in grid units.
    """

    def __init__(self, channels: int = 2048, mode: str = "mask", fast: bool = True,
                 hidden: int = 128, fc: int = 64, scale: float = 0.75, delta: float = 0.2):
        super().__init__()
        if mode not in SC_MODES:
            raise ValueError(f"unknown SC mode {mode!r}; choose one of {SC_MODES}")
        self.channels, self.mode, self.fast, self.scale = channels, mode, fast, scale
        self.mvnet = None
        if mode != "enumerate":
            self.mvnet = nn.Sequential(
                nn.Conv3d(2 * channels, hidden, 3, padding=1),
                nn.BatchNorm3d(hidden),
                nn.MaxPool3d((1, 2, 2)),
                nn.ReLU(),
                nn.Conv3d(hidden, hidden, 3, padding=1),
                nn.BatchNorm3d(hidden),
                nn.MaxPool3d((1, 2, 2)),
                nn.ReLU(),
                nn.AdaptiveMaxPool3d((None, 1, 1)),
                nn.Flatten(2),
                nn.Conv1d(hidden, fc, 1),
                nn.ReLU(),
                nn.Conv1d(fc, 2, 1),
                nn.Tanh(),
            )
            # the perturbation step is state: it is halved during training and resumes with it
            self.register_buffer("delta", torch.tensor(float(delta)))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if self.mvnet is None:
            return
        for layer in self.mvnet:
            reset_layer(layer, generator)
        with torch.no_grad():
            self.mvnet[-2].weight.zero_()
            self.mvnet[-2].bias.zero_()

    def decay(self) -> None:
        """Halve the perturbation step (the authors' schedule calls this every 40 epochs)."""
        if self.mvnet is not None:
            self.delta.mul_(0.5)

    def forward(self, support: torch.Tensor, query: torch.Tensor, tc: torch.Tensor | None):
        """Pair features f_s, f_q (N, M, C, T) and offsets (N, M, T, 2).

        Args:
            support: s~ (N, C, T, H, W), the prototypes after TC (or without it).
            query: (M, C, T, H, W), the queries before TC's pair term.
            tc: (N, M, C, T) TC's pair term, or None without TC.
        """
        if self.mode == "enumerate":
            return self._enumerate(support, query, tc)
        if self.fast:
            offsets = self._offsets_fast(support, query, tc)  # (N, M, T, 2)
            mask_s, mask_q = self._pair_masks(offsets, *support.shape[-2:])  # (N, M, T, H, W)
            f_s = torch.einsum("nmthw,ncthw->nmct", mask_s.to(support.dtype), support)
            f_q = torch.einsum("nmthw,mcthw->nmct", mask_q.to(query.dtype), query)  # (N, M, C, T)
            # each mask sums to 1, so the constant-over-HW term passes through the pooling
            return f_s, (f_q if tc is None else f_q + tc), offsets
        query_t = _pair_queries(support.shape[0], query, tc)  # (N, M, C, T, H, W)
        offsets = self._offsets_direct(support, query_t)  # (N, M, T, 2)
        mask_s, mask_q = self._pair_masks(offsets, *support.shape[-2:])  # (N, M, T, H, W)
        f_s = (mask_s[:, :, None] * support[:, None]).sum((-2, -1))  # (N, M, C, T)
        f_q = (mask_q[:, :, None] * query_t).sum((-2, -1))  # (N, M, C, T)
        return f_s, f_q, offsets

    # -------------------------------------------------------------------------- offsets
    def _offsets_direct(self, support: torch.Tensor, query_t: torch.Tensor) -> torch.Tensor:
        """The authors' form: concatenate every pair on channels and run the predictor."""
        n, m = query_t.shape[:2]
        support_b = support[:, None].expand(n, m, *support.shape[1:])  # (N, M, C, T, H, W)
        pairs = torch.cat([support_b, query_t], 2).flatten(0, 1)  # (NM, 2C, T, H, W)
        out = self.mvnet(pairs)  # (NM, 2, T)
        return (out * self.scale).transpose(1, 2).unflatten(0, (n, m))  # (N, M, T, 2)

    def _offsets_fast(self, support: torch.Tensor, query: torch.Tensor,
                      tc: torch.Tensor | None) -> torch.Tensor:
        """The same offsets with the first conv split into prototype, query and TC parts."""
        n, m, c = support.shape[0], query.shape[0], self.channels
        conv = self.mvnet[0]
        h_s = F.conv3d(support, conv.weight[:, :c], conv.bias, padding=1)  # (N, K, T, H, W)
        h_q = F.conv3d(query, conv.weight[:, c:], None, padding=1)  # (M, K, T, H, W)
        h = h_s[:, None] + h_q[None]  # (N, M, K, T, H, W)
        if tc is not None:
            h = h + _constant_map_conv(tc, conv.weight[:, c:], *support.shape[-2:])
        out = self.mvnet[1:](h.flatten(0, 1))  # (NM, 2, T)
        return (out * self.scale).transpose(1, 2).unflatten(0, (n, m))  # (N, M, T, 2)

    def _pair_masks(self, offsets: torch.Tensor, height: int, width: int):
        """Masks of +o (prototype) and -o (query), (N, M, T, H, W); perturbed in training."""
        make = offset_mask if self.mode == "mask" else grid_mask
        offsets = at_least_fp32(offsets)
        both = torch.stack([offsets, -offsets])  # (2, N, M, T, 2): +o and -o in one call
        if not self.training:
            mask_s, mask_q = make(both, height, width).unbind(0)  # (N, M, T, H, W) each
            return mask_s, mask_q
        steps = torch.tensor(PERTURBATIONS, device=offsets.device, dtype=offsets.dtype)  # (9, 2)
        delta = self.delta.to(offsets.dtype) * steps  # (9, 2)
        signed = torch.stack([delta, -delta]).view(2, *[1] * (offsets.dim() - 1), 9, 2)
        perturbed = both.unsqueeze(-2) + signed  # (2, ..., 9, 2)
        mask_s, mask_q = make(perturbed, height, width).mean(-3).unbind(0)  # (N, M, T, H, W)
        return mask_s, mask_q

    # -------------------------------------------------------------------------- enumerate
    def _enumerate(self, support: torch.Tensor, query: torch.Tensor, tc: torch.Tensor | None):
        """Per frame, the integer shift whose pooled pair is closest (cosine), no predictor."""
        height, width = support.shape[-2:]
        dtype = torch.promote_types(support.dtype, torch.float32)
        cands = integer_offsets(height, width, support.device, dtype)  # (S, 2)
        mask_s = offset_mask(cands, height, width).to(support.dtype)  # (S, H, W) boxes
        mask_q = offset_mask(-cands, height, width).to(query.dtype)  # (S, H, W)
        pooled_s = torch.einsum("shw,ncthw->ntsc", mask_s, support)  # (N, T, S, C)
        pooled_q = torch.einsum("shw,mcthw->mtsc", mask_q, query)  # (M, T, S, C)
        with torch.no_grad():
            best = _closest_shift(pooled_s, pooled_q, tc)  # (N, M, T)
        n, m, frames = best.shape
        n_idx = torch.arange(n, device=best.device)[:, None, None]  # (N, 1, 1)
        m_idx = torch.arange(m, device=best.device)[None, :, None]  # (1, M, 1)
        t_idx = torch.arange(frames, device=best.device)[None, None, :]  # (1, 1, T)
        f_s = pooled_s[n_idx, t_idx, best].permute(0, 1, 3, 2)  # (N, M, C, T)
        f_q = pooled_q[m_idx, t_idx, best].permute(0, 1, 3, 2)  # (N, M, C, T)
        if tc is not None:
            f_q = f_q + tc
        return f_s, f_q, cands[best]  # offsets (N, M, T, 2)


def _pair_queries(n: int, query: torch.Tensor, tc: torch.Tensor | None) -> torch.Tensor:
    """The pairs' query maps q~[n, m] (N, M, C, T, H, W), built in full (direct form only)."""
    if tc is None:
        return query[None].expand(n, *query.shape)  # (N, M, C, T, H, W)
    return query[None] + tc[..., None, None]  # (N, M, C, T, H, W)


def _constant_map_conv(tc: torch.Tensor, weight: torch.Tensor, height: int,
                       width: int) -> torch.Tensor:
    """conv3d(weight, padding 1) of maps equal to tc (N, M, C, T) at every H, W position.

    Inside the map the output depends on (h, w) only through which kernel taps read inside
    the map: the first, interior or last row / column. Summing the kernel over those taps for
    each of the 3 x 3 cases leaves a temporal conv; its outputs are copied to the H x W map.
    """
    n, m, c, frames = tc.shape
    k = weight.shape[0]
    taps = torch.tensor(REGION_TAPS, device=weight.device, dtype=weight.dtype)  # (3 cases, 3 taps)
    kernels = torch.einsum("kcdij,ai,bj->kabcd", weight, taps, taps)  # (K, 3, 3, C, 3)
    out = F.conv1d(tc.flatten(0, 1), kernels.reshape(k * 9, c, 3), padding=1)  # (NM, 9K, T)
    out = out.view(n, m, k, 3, 3, frames).permute(0, 1, 2, 5, 3, 4)  # (N, M, K, T, 3, 3)
    return _spread_cases(_spread_cases(out, -2, height), -1, width)  # (N, M, K, T, H, W)


def _spread_cases(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Copy the 3 cases along ``dim`` (first, interior, last) to ``length`` positions."""
    first, interior, last = x.split(1, dim)
    sizes = list(interior.shape)
    sizes[dim] = length - 2
    return torch.cat([first, interior.expand(sizes), last], dim)


def _closest_shift(pooled_s: torch.Tensor, pooled_q: torch.Tensor,
                   tc: torch.Tensor | None) -> torch.Tensor:
    """argmin over shifts of the frame cosine distance (..., N, M, T), without (N, M, T, S, C).

    pooled_s (..., N, T, S, C), pooled_q (..., M, T, S, C), tc (..., N, M, C, T) or None; the
    leading dims (episodes) are optional. With TC the query feature is pooled_q[m] + tc[n, m];
    its dot products and norm expand into einsums over C.
    """
    dot = torch.einsum("...ntsc,...mtsc->...nmts", pooled_s, pooled_q)  # (..., N, M, T, S)
    norm_q2 = pooled_q.pow(2).sum(-1).unsqueeze(-4)  # (..., 1, M, T, S)
    if tc is not None:
        dot = dot + torch.einsum("...ntsc,...nmct->...nmts", pooled_s, tc)
        cross = torch.einsum("...mtsc,...nmct->...nmts", pooled_q, tc)  # (..., N, M, T, S)
        norm_q2 = norm_q2 + 2 * cross + tc.pow(2).sum(-2)[..., None]  # (..., N, M, T, S)
    norm_s = pooled_s.pow(2).sum(-1).sqrt().unsqueeze(-3)  # (..., N, 1, T, S)
    norm_q = norm_q2.clamp_min(0).sqrt()  # (..., N|1, M, T, S)
    cos = dot / (norm_s.clamp_min(1e-12) * norm_q.clamp_min(1e-12))  # (..., N, M, T, S)
    return cos.argmax(-1)  # (..., N, M, T) closest = largest cosine


# ------------------------------------------------------------------------------ factored SC
def first_conv_halves(sc: SpatialCoordination):
    """SC's first conv split by input: (prototype half (O, C, 3, 3, 3), query half, bias (O,))."""
    conv = sc.mvnet[0]
    w_support, w_query = conv.weight.split(sc.channels, dim=1)  # one node: no zero-filled grads
    return w_support, w_query, conv.bias


def case_tap_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(3 taps, 9 O, C): a Conv3d kernel (O, C, 3, 3, 3) summed, per temporal tap, over the
    spatial taps that read inside the map in each of the 3 x 3 cases of the zero padding.

    For maps constant over H, W (TC's terms) the conv is then a temporal one per case:
    ``constant_taps`` gives its taps, ``tap_mix`` the time mixing, ``spread_constant`` the map.
    One matmul of the 9 x 9 case-by-tap matrix (REGION_TAPS (x) REGION_TAPS) with the kernel
    laid out (3, O, 9, C): a single op forward and backward, where einsum made tiny matmuls.
    """
    taps = torch.tensor(REGION_TAPS, device=weight.device, dtype=weight.dtype)  # (3 cases, 3)
    cases = torch.kron(taps, taps)  # (9 cases (a, b), 9 taps (i, j))
    w = weight.permute(2, 0, 3, 4, 1).reshape(3, weight.shape[0], 9, -1)  # (3 d, O, 9, C)
    return (cases @ w).flatten(1, 2)  # (3, 9 O, C)


def constant_taps(values: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Taps (n, 3, 9 O, T) of the conv of maps constant over H, W equal to values (n, C, T)."""
    return torch.einsum("dkc,nct->ndkt", kernels.to(values.dtype), values)  # (n, 3, 9 O, T)


def spread_constant(out: torch.Tensor, height: int, width: int,
                    keep: tuple[int, int] | None = None) -> torch.Tensor:
    """(..., 9 O, T) per-case conv outputs -> (..., O, T, H', W'), the case of each position
    copied to it (first, interior, last row / column); ``keep`` = (H', W') crops."""
    cases = out.unflatten(-2, (-1, 3, 3)).movedim(-1, -3)  # (..., O, T, 3, 3)
    full = _spread_cases(_spread_cases(cases, -2, height), -1, width)  # (..., O, T, H, W)
    return full if keep is None else full[..., :keep[0], :keep[1]]


def add_constant_cases(h: torch.Tensor, cases: torch.Tensor, height: int,
                       width: int) -> torch.Tensor:
    """h (..., H', W') + cases (..., 3, 3) spread over the (H, W) map's first / interior /
    last rows and columns; h may be a top-left crop (H' <= H, W' <= W).

    Without autograd in play the cases are added in place, each position once, and no
    (..., H, W) copy of them is made. Under autograd nine in-place slice adds would each cost
    a full copy of h in the backward pass (CopySlices), so the cases are gathered to
    (..., H', W') once and added out of place.
    """
    if torch.is_grad_enabled() and (h.requires_grad or cases.requires_grad):
        spread = _spread_cases(_spread_cases(cases, -1, width), -2, height)  # (..., H, W)
        return h + spread[..., :h.shape[-2], :h.shape[-1]]
    for a, rows in _case_slices(height, h.shape[-2]):
        for b, cols in _case_slices(width, h.shape[-1]):
            h[..., rows, cols] += cases[..., a:a + 1, b:b + 1]
    return h


def _case_slices(length: int, kept: int) -> list[tuple[int, slice]]:
    """(case, positions) of the first, interior and last rows among the first ``kept``."""
    out = [(0, slice(0, 1)), (1, slice(1, min(kept, length - 1)))]
    if kept == length:
        out.append((2, slice(length - 1, length)))
    return out
