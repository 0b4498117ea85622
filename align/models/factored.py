"""TA2N factored: the work that depends on one video only is separated from the work that
depends on an episode's pairs, with the same results as the direct form (exact algebra, tested
in float64 for values and gradients).

What is factored out, and why it is exact:

1. Time mixing. TTM's warp and the multi-shot attention are (T, T) matrices acting on time only
   (``mix_time``); channel maps (Wv', Wk, Wq, Wv), spatial means and spatial pooling commute
   with them. So a prototype is the mix of its raw shots by the product of both matrices, and
   Wv' runs after pooling or on the few prototype maps - never on every query map.
2. SC's first conv after a time mix. A Conv3d with 3 temporal taps and padding 1 of a mixed map
   is out[t] = sum_d sum_s M[t+d-1, s] Z_d[s], with Z_d the per-frame 2-D conv of tap d of the
   unmixed map (``tap_convs`` / ``tap_mix``): the convolution over C reads the raw (or
   precomputed) map, and no gradient flows back through C channels. Wv' before it folds into
   one kernel, W_q Wv'.
3. TC's terms are constant over H, W: their conv is a temporal conv per padding case
   (``case_tap_kernels``), and TC's time mixing moves past it the same way.
4. In eval mode BatchNorm is affine per position, so outputs that a following MaxPool drops
   (row and column 6 of a 7 x 7 map) are not computed (``layers.run_layers``).

Two uses, one pair step (``pair_logits``):

- ``episode_terms``: E episodes from their raw maps, in training or eval mode (BatchNorm batch
  statistics per episode): the training forward and ``forward_episodes``.
- ``video_states`` + ``state_terms``: in eval mode, every episode-independent tensor once per
  video (``Head.precompute``), then per episode only the mixing and the pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from align.models.acm import (
    _closest_shift,
    add_constant_cases,
    case_tap_kernels,
    constant_taps,
    first_conv_halves,
    integer_offsets,
    offset_mask,
)
from align.models.layers import (
    apply_running_updates,
    batch_norm_affine,
    channel_linear,
    conv3d_kept,
    frame_cosine_distance,
    mix_time,
    mix_time_major,
    pooled_extent,
    run_layers,
    shifted_taps,
    tap_convs,
    tap_mix,
)
from align.models.ttm import warp_weights


@dataclass
class ClassTerms:
    """What the pair step needs of the episodes' classes; B = E * way rows, episode-major.

    Args:
        maps: (B, T, C, H, W) prototype maps, time-major (SC pools them with one batched
            matmul per frame), without TC's residual; or None without SC.
        mean: (B, C, T) their spatial means.
        key: (B, C, T) TC's Wk of the mean, or None without TC.
        residual: (B, C, T) TC's Wv of the mean (added to the prototype), or None.
        conv: (B, O, T, H', W') SC's first conv of the prototype half (residual and bias
            included), or None without a predictor.
        normalized: ``conv`` and the query terms include SC's first BatchNorm (eval: folded).
    """

    maps: torch.Tensor | None
    mean: torch.Tensor
    key: torch.Tensor | None
    residual: torch.Tensor | None
    conv: torch.Tensor | None
    normalized: bool = False


@dataclass
class QueryTerms:
    """What the pair step needs of the episodes' queries; B = E * M rows.

    Args:
        maps: (B, T, C, H, W) query maps, time-major, for SC's pooling, or None without SC.
        project: applied to the pooled query features when ``maps`` are not yet projected by
            Wv' (training K > 1: Wv' after pooling), else None.
        mean: (B, C, T) spatial means (projected).
        query, value: (B, C, T) TC's Wq and Wv of the mean, or None without TC.
        conv: (B, O, T, H', W') SC's first conv of the query half, or None.
        value_taps: (B, 3, 9 O, T) the query-half case kernels on ``value`` (TC's pair term
            through SC's first conv), or None.
    """

    maps: torch.Tensor | None
    project: Callable[[torch.Tensor], torch.Tensor] | None
    mean: torch.Tensor
    query: torch.Tensor | None
    value: torch.Tensor | None
    conv: torch.Tensor | None
    value_taps: torch.Tensor | None


# ------------------------------------------------------------------------------ per video
def warps(head, maps: torch.Tensor, groups: int) -> torch.Tensor | None:
    """TTM's warp matrices (n, T, T) of maps (n, C, T, H, W) stacking ``groups`` batches."""
    if head.ttm is None:
        return None
    theta = run_layers(head.ttm.locnet, maps, groups)  # (n, 2)
    return warp_weights(theta, maps.shape[2])  # (n, T, T)


def episode_warps(head, support: torch.Tensor, query: torch.Tensor, episodes: int):
    """Warps (n, T, T) of E episodes' supports and queries. As in the authors' code, each
    episode's supports and its queries are separate BatchNorm batches; the running statistics
    are updated in the order of per-episode calls (support 0, query 0, support 1 ...)."""
    if head.ttm is None:
        return None, None
    interleave = head.training and episodes > 1
    calls = ([], []) if interleave else (None, None)
    thetas = [run_layers(head.ttm.locnet, maps, episodes, deferred)  # (n, 2)
              for maps, deferred in zip((support, query), calls)]
    if interleave:
        apply_running_updates(list(calls), episodes)
    frames = support.shape[2]
    return tuple(warp_weights(theta, frames) for theta in thetas)  # (n, T, T) x 2


def predicts_offsets(head) -> bool:
    return head.sc is not None and head.sc.mvnet is not None


def sc_keep(head, height: int, width: int) -> tuple[int, int] | None:
    """The (H', W') of SC's first conv output that its first MaxPool reads (eval mode only)."""
    if head.sc.mvnet[1].training:
        return None
    return pooled_extent(head.sc.mvnet[2], (height, width))


def video_states(head, maps: torch.Tensor, shot: int) -> dict[str, torch.Tensor]:
    """Every episode-independent tensor of videos (n, C, T, H, W), head in eval mode.

    Keys (n leading): maps (T, C, H, W) warped, projected by Wv' when shot > 1, time-major
    (with SC); mean (C, T); shot_key, shot_query (C, T) Wk', Wq' of the warped mean (shot > 1);
    tc_key, tc_query, tc_value (C, T) (TC); support_taps (3, T, O, H', W'), query_conv (O, T,
    H', W') (SC's predictor); support_value_taps, query_value_taps (3, 9 O, T) (predictor and
    TC). The predictor's terms include its first BatchNorm's scale (eval: an affine map).
    """
    height, width = maps.shape[-2:]
    warped = mix_time(warps(head, maps, 1), maps) if head.ttm is not None else maps
    state: dict[str, torch.Tensor] = {}
    projected = warped
    if shot > 1:
        pooled = warped.mean((-2, -1))  # (n, C, T)
        state["shot_key"] = channel_linear(head.shots.keynet, pooled)  # (n, C, T)
        state["shot_query"] = channel_linear(head.shots.querynet, pooled)  # (n, C, T)
        projected = head.shots.project(warped)  # (n, C, T, H, W)
    state["mean"] = projected.mean((-2, -1))  # (n, C, T)
    if head.tc is not None:
        for name, net in (("key", head.tc.keynet), ("query", head.tc.querynet),
                          ("value", head.tc.valuenet)):
            state[f"tc_{name}"] = channel_linear(net, state["mean"])  # (n, C, T)
    if head.sc is not None:
        state["maps"] = projected.transpose(1, 2).contiguous()  # (n, T, C, H, W)
    if predicts_offsets(head):
        w_support, w_query, _ = first_conv_halves(head.sc)
        scale = batch_norm_affine(head.sc.mvnet[1])[0]  # (O,) the first BatchNorm's
        w_support, w_query = (w * scale.view(-1, 1, 1, 1, 1) for w in (w_support, w_query))
        keep = sc_keep(head, height, width)
        taps = tap_convs(projected, w_support, keep)  # (n, 3, O, T, H', W')
        state["support_taps"] = taps.transpose(2, 3).contiguous()  # (n, 3, T, O, H', W')
        state["query_conv"] = conv3d_kept(projected, w_query, None, (1, 1, 1), keep)
        if head.tc is not None:
            for half, weight in (("support", w_support), ("query", w_query)):
                state[f"{half}_value_taps"] = constant_taps(
                    state["tc_value"], case_tap_kernels(weight))  # (n, 3, 9 O, T)
    return state


# ------------------------------------------------------------------------------ episode terms
def episode_terms(head, support: torch.Tensor, query: torch.Tensor, way: int, shot: int,
                  episodes: int) -> tuple[ClassTerms, QueryTerms]:
    """Terms of E episodes from raw maps: support (E*way*shot, C, T, H, W) and query (E*M, C,
    T, H, W), episode-major; any mode, BatchNorm statistics per episode in training.

    The raw maps carry no gradient: every product with a weight reads them directly (taps,
    folded kernels, projections of spatial means before the time mix), so no map-sized
    gradient goes back through a convolution or a C x C projection; the one map-sized
    gradient left is SC's pooling's, on the warped query maps, for the (T, T) warps."""
    w_s, w_q = episode_warps(head, support, query, episodes)  # (n, T, T) each, or None
    mix = time_mixing(head, support, w_s, way * episodes, shot)  # (E*way, K, T, T)
    mixed = mix_time_major(mix, support).transpose(1, 2)  # (B, C, T, H, W)
    project = partial(channel_linear, head.shots.valuenet) if shot > 1 else None
    protos = head.shots.project(mixed) if shot > 1 else mixed  # (B, C, T, H, W)
    mean_q = query.mean((-2, -1))  # (E*M, C, T) of the raw maps
    if project is not None:
        mean_q = project(mean_q)  # (E*M, C, T): Wv' commutes with the time mix
    if w_q is not None:
        mean_q = mix_time(w_q, mean_q)  # (E*M, C, T)
    maps_q = None
    if head.sc is not None:
        maps_q = mix_time_major(None if w_q is None else w_q[:, None], query)  # (E*M,T,C,H,W)
        if project is not None and head.sc.mode == "enumerate":  # every shift is compared
            maps_q = head.shots.project(maps_q.transpose(1, 2)).transpose(1, 2)
            project = None
    # SC's first conv split once (each split of a parameter costs a full-size gradient)
    halves = first_conv_halves(head.sc) if predicts_offsets(head) else None
    support_conv = None
    if shot == 1 and w_s is not None and halves is not None:
        # the prototypes are warped supports: taps on the raw maps, no gradient through C
        w_support, _, bias = halves
        support_conv = tap_mix(w_s, tap_convs(support, w_support))  # (B, O, T, H, W)
        support_conv = support_conv + bias[:, None, None, None]
    kernels = None  # (3, 9 O, C) per half: both halves' case kernels in one call
    if head.tc is not None and halves is not None:
        kernels = case_tap_kernels(head.sc.mvnet[0].weight).split(head.sc.channels, -1)
    classes = _class_terms(head, protos, support_conv, halves, kernels)
    value = ask = None
    if head.tc is not None:
        ask = channel_linear(head.tc.querynet, mean_q)  # (E*M, C, T)
        value = channel_linear(head.tc.valuenet, mean_q)  # (E*M, C, T)
    terms = QueryTerms(maps=maps_q, project=project, mean=mean_q, query=ask, value=value,
                       conv=None, value_taps=None)
    if halves is not None:
        w_query = halves[1]
        weight = w_query
        if shot > 1:  # Wv' then the conv: one kernel W_q Wv'
            weight = torch.einsum("ocdij,ce->oedij", w_query, head.shots.valuenet.weight.flatten(1))
        if w_q is None:
            terms.conv = F.conv3d(query, weight, padding=1)  # (E*M, O, T, H, W)
        else:
            terms.conv = tap_mix(w_q, tap_convs(query, weight))  # (E*M, O, T, H, W)
        if value is not None:
            terms.value_taps = constant_taps(value, kernels[1])  # (E*M, 3, 9 O, T)
    return classes, terms


def time_mixing(head, support: torch.Tensor, w_s: torch.Tensor | None, classes: int,
                shot: int) -> torch.Tensor:
    """(classes, K, T, T) matrices mixing each class's raw shots into its prototype: the shot
    attention (transposed, / K) times the shot's warp; the warp alone at K = 1.

    Wk' and Wq' run on the raw shots' spatial means and the warp after them (1x1 projections
    commute with a time mix): no input gradient through the C x C projections."""
    frames = support.shape[2]
    if shot == 1:
        if w_s is not None:
            return w_s[:, None]  # (classes, 1, T, T)
        eye = torch.eye(frames, device=support.device, dtype=support.dtype)
        return eye.expand(classes, 1, frames, frames)
    pooled = support.mean((-2, -1))  # (n, C, T) raw
    keys = channel_linear(head.shots.keynet, pooled)  # (n, C, T)
    firsts = pooled.unflatten(0, (classes, shot))[:, 0]  # (classes, C, T) reference shots
    refs = channel_linear(head.shots.querynet, firsts)  # (classes, C, T)
    if w_s is not None:
        keys = mix_time(w_s, keys)  # (n, C, T) Wk' of the warped means
        refs = mix_time(w_s.unflatten(0, (classes, shot))[:, 0], refs)  # (classes, C, T)
    attn = head.shots.attention_from_keys(keys, refs, classes, shot)  # (classes, K, T_x, T_y)
    mix = attn.transpose(-1, -2) / shot  # (classes, K, T_y, T_x)
    if w_s is not None:
        mix = mix @ w_s.unflatten(0, (classes, shot)).to(mix.dtype)  # (classes, K, T, T)
    return mix


def _class_terms(head, protos: torch.Tensor, conv: torch.Tensor | None, halves: tuple | None,
                 kernels: tuple | None) -> ClassTerms:
    """ClassTerms of prototype maps (B, C, T, H, W); SC's prototype-half conv (bias included)
    is ``conv`` when given, else computed on the maps. ``halves``: ``first_conv_halves`` (None
    without SC's predictor); ``kernels``: the halves' case kernels (3, 9 O, C) (with TC)."""
    mean = protos.mean((-2, -1))  # (B, C, T)
    key = residual = None
    if head.tc is not None:
        key = channel_linear(head.tc.keynet, mean)  # (B, C, T)
        residual = channel_linear(head.tc.valuenet, mean)  # (B, C, T)
    if halves is not None:
        w_support, _, bias = halves
        if conv is None:
            conv = F.conv3d(protos, w_support, bias, padding=1)  # (B, O, T, H, W)
        if residual is not None:
            taps = constant_taps(residual, kernels[0])  # (B, 3, 9 O, T)
            cases = tap_mix(None, taps).unflatten(1, (-1, 3, 3)).movedim(-1, 2)  # (B,O,T,3,3)
            conv = add_constant_cases(conv, cases, *protos.shape[-2:])
    return ClassTerms(maps=protos.transpose(1, 2) if head.sc is not None else None, mean=mean,
                      key=key, residual=residual, conv=conv)


# ------------------------------------------------------------------------------ from states
def state_terms(head, support: dict, query: dict, way: int, shot: int,
                episodes: int) -> tuple[ClassTerms, QueryTerms]:
    """Terms of E episodes from per-video states (``video_states``): support rows (E*way*shot,
    ...) and query rows (E*M, ...), episode-major. Per episode only the shots are mixed."""
    classes = way * episodes
    mix = None  # (B, K, T_y, T_x): the shots' attention, transposed, / K
    if shot > 1:
        refs = support["shot_query"].unflatten(0, (classes, shot))[:, 0]  # (B, C, T)
        attn = head.shots.attention_from_keys(support["shot_key"], refs, classes, shot)
        mix = attn.transpose(-1, -2) / shot  # (B, K, T_y, T_x)

    def over_shots(x: torch.Tensor) -> torch.Tensor:  # (B*K, C, T) -> (B, C, T)
        if mix is None:
            return x
        return torch.einsum("bkts,bkcs->bct", mix.to(x.dtype), x.unflatten(0, (classes, shot)))

    conv = maps = None
    if "maps" in support:
        maps = support["maps"]  # (B*K, T, C, H, W)
        if mix is not None:  # one matmul per class: (T, K*T) x (K*T, C*H*W)
            frames = maps.shape[1]
            flat = mix.to(maps.dtype).transpose(1, 2).reshape(classes, frames, -1)
            maps = (flat @ maps.reshape(classes, shot * frames, -1)).view(
                classes, *maps.shape[1:])  # (B, T, C, H, W)
    if predicts_offsets(head):
        conv = _mixed_taps(mix, support["support_taps"], classes)  # (B, O, T, H', W')
        scale, shift = batch_norm_affine(head.sc.mvnet[1])
        bias = first_conv_halves(head.sc)[2] * scale + shift  # (O,) bias and BatchNorm
        conv = conv + bias.to(conv.dtype)[:, None, None, None]
        if "support_value_taps" in support:
            taps = support["support_value_taps"]  # (B*K, 3, 9 O, T)
            if mix is None:
                cases = tap_mix(None, taps)  # (B, 9 O, T)
            else:
                cases = torch.einsum("bkdts,bkdos->bot", shifted_taps(mix.to(taps.dtype)),
                                     taps.unflatten(0, (classes, shot)))  # (B, 9 O, T)
            cases = cases.unflatten(1, (-1, 3, 3)).movedim(-1, 2)  # (B, O, T, 3, 3)
            conv = add_constant_cases(conv, cases, *support["maps"].shape[-2:])
    get = support.get
    class_terms = ClassTerms(
        maps=maps, mean=over_shots(support["mean"]),
        key=over_shots(get("tc_key")) if "tc_key" in support else None,
        residual=over_shots(get("tc_value")) if "tc_value" in support else None, conv=conv,
        normalized=True)
    query_terms = QueryTerms(maps=query.get("maps"), project=None, mean=query["mean"],
                             query=query.get("tc_query"), value=query.get("tc_value"),
                             conv=query.get("query_conv"), value_taps=query.get("query_value_taps"))
    return class_terms, query_terms


def _mixed_taps(mix: torch.Tensor | None, taps: torch.Tensor, classes: int) -> torch.Tensor:
    """SC's prototype-half conv (B, O, T, H', W') from the shots' taps (B*K, 3, T, O, H', W'):
    sum_k sum_d sum_s mix[k, t+d-1, s] taps[k, d, s], one matmul per class."""
    frames = taps.shape[2]
    shot = taps.shape[0] // classes
    if mix is None:
        mix = torch.eye(frames, device=taps.device).expand(classes, 1, frames, frames)
    shifted = shifted_taps(mix.to(taps.dtype))  # (B, K, 3, T_out, T_s)
    flat = shifted.permute(0, 3, 1, 2, 4).reshape(classes, frames, -1)  # (B, T, K*3*T)
    out = flat @ taps.reshape(classes, shot * 3 * frames, -1)  # (B, T, O*H'*W')
    return out.view(classes, frames, *taps.shape[3:]).transpose(1, 2)  # (B, O, T, H', W')


# ------------------------------------------------------------------------------ pairs
def pair_logits(head, classes: ClassTerms, queries: QueryTerms, episodes: int) -> torch.Tensor:
    """Logits (E, M, way) of every (prototype, query) pair of E episodes: TC's attention,
    SC's offsets and pooling, the frame cosine distance. Pair features are (E, N, M, T, C)."""
    mean_s = classes.mean.unflatten(0, (episodes, -1)).transpose(-1, -2)  # (E, N, T, C)
    mean_q = queries.mean.unflatten(0, (episodes, -1)).transpose(-1, -2)  # (E, M, T, C)
    n, m = mean_s.shape[1], mean_q.shape[1]
    attn = tc = residual = None
    if head.tc is not None:
        keys = classes.key.unflatten(0, (episodes, n))  # (E, N, C, T)
        asks = queries.query.unflatten(0, (episodes, m))  # (E, M, C, T)
        logits = torch.einsum("encx,emcy->enmxy", keys, asks) / math.sqrt(keys.shape[2])
        attn = logits.softmax(-1)  # (E, N, M, T_x, T_y) over query time y
        values = queries.value.unflatten(0, (episodes, m))  # (E, M, C, T)
        tc = torch.einsum("enmxy,emcy->enmxc", attn, values)  # (E, N, M, T, C)
        residual = classes.residual.unflatten(0, (episodes, n)).transpose(-1, -2)[:, :, None]
    if head.sc is None:
        f_s = mean_s[:, :, None] if residual is None else mean_s[:, :, None] + residual
        f_s = f_s.expand(-1, -1, m, -1, -1)  # (E, N, M, T, C)
        f_q = mean_q[:, None].expand(-1, n, -1, -1, -1)  # (E, N, M, T, C)
    elif head.sc.mode == "enumerate":
        f_s, f_q = _enumerate_features(classes, queries, residual, tc, episodes)
    else:
        offsets = _offsets(head, classes, queries, attn, episodes)  # (E, N, M, T, 2)
        mask_s, mask_q = head.sc._pair_masks(offsets, *classes.maps.shape[-2:])
        f_s = pool_pairs(mask_s, classes.maps, episodes, by_class=True)  # (E, N, M, T, C)
        f_q = pool_pairs(mask_q, queries.maps, episodes, by_class=False)  # (E, N, M, T, C)
        if queries.project is not None:
            f_q = queries.project(f_q.transpose(-1, -2)).transpose(-1, -2)  # (E, N, M, T, C)
        if residual is not None:
            f_s = f_s + residual  # (E, N, M, T, C)
    if tc is not None:
        f_q = f_q + tc  # (E, N, M, T, C)
    distances = frame_cosine_distance(f_s, f_q, channel_dim=-1)  # (E, N, M)
    return -distances.transpose(1, 2)  # (E, M, N)


def pool_pairs(mask: torch.Tensor, maps: torch.Tensor, episodes: int,
               by_class: bool) -> torch.Tensor:
    """SC's masked pooling of every pair: mask (E, N, M, T, H, W) on the classes' (by_class)
    or the queries' time-major maps (E*X, T, C, H, W) -> (E, N, M, T, C); per frame one batched
    (pairs, H*W) x (H*W, C) matmul on a view of the maps."""
    e, n, m, frames = mask.shape[:4]
    flat = maps.reshape(e, -1, frames, maps.shape[2], mask.shape[-2] * mask.shape[-1])
    weights = mask.flatten(-2).to(maps.dtype)  # (E, N, M, T, HW)
    if by_class:
        out = weights.permute(0, 1, 3, 2, 4) @ flat.transpose(-1, -2)  # (E, N, T, M, C)
        return out.transpose(2, 3)  # (E, N, M, T, C)
    out = weights.permute(0, 2, 3, 1, 4) @ flat.transpose(-1, -2)  # (E, M, T, N, C)
    return out.permute(0, 3, 1, 2, 4)  # (E, N, M, T, C)


def _offsets(head, classes: ClassTerms, queries: QueryTerms, attn: torch.Tensor | None,
             episodes: int) -> torch.Tensor:
    """SC's offsets (E, N, M, T, 2) from the first conv's halves, summed per pair."""
    h_s = classes.conv.unflatten(0, (episodes, -1))  # (E, N, O, T, H', W')
    h_q = queries.conv.unflatten(0, (episodes, -1))  # (E, M, O, T, H', W')
    h = h_s[:, :, None] + h_q[:, None]  # (E, N, M, O, T, H', W')
    if attn is not None and queries.value_taps is not None:
        taps = queries.value_taps.unflatten(0, (episodes, -1))  # (E, M, 3, 9 O, T)
        out = torch.einsum("enmdts,emdks->enmkt", shifted_taps(attn.to(taps.dtype)), taps)
        cases = out.unflatten(3, (-1, 3, 3)).movedim(-1, 4)  # (E, N, M, O, T, 3, 3)
        h = add_constant_cases(h, cases, *classes.maps.shape[-2:])
    e, n, m = h.shape[:3]
    layers = head.sc.mvnet[2:] if classes.normalized else head.sc.mvnet[1:]
    out = run_layers(layers, h.flatten(0, 2), episodes)  # (E*N*M, 2, T)
    return (out * head.sc.scale).transpose(1, 2).unflatten(0, (e, n, m))  # (E, N, M, T, 2)


def _enumerate_features(classes: ClassTerms, queries: QueryTerms, residual, tc, episodes: int):
    """SC's enumerate variant: per frame the integer shift whose pooled pair is closest."""
    maps_s, maps_q = classes.maps, queries.maps  # (B, T, C, H, W) each
    height, width = maps_s.shape[-2:]
    dtype = torch.promote_types(maps_s.dtype, torch.float32)
    cands = integer_offsets(height, width, maps_s.device, dtype)  # (S, 2)
    mask_s = offset_mask(cands, height, width).to(maps_s.dtype)  # (S, H, W)
    mask_q = offset_mask(-cands, height, width).to(maps_q.dtype)  # (S, H, W)
    pooled_s = torch.einsum("shw,ntchw->ntsc", mask_s, maps_s)  # (B, T, S, C)
    pooled_q = torch.einsum("shw,mtchw->mtsc", mask_q, maps_q)  # (B', T, S, C)
    pooled_s = pooled_s.unflatten(0, (episodes, -1))  # (E, N, T, S, C)
    pooled_q = pooled_q.unflatten(0, (episodes, -1))  # (E, M, T, S, C)
    if residual is not None:  # the prototype's residual is constant over H, W: every shift
        pooled_s = pooled_s + residual[:, :, 0, :, None]  # (E, N, T, S, C)
    with torch.no_grad():
        best = _closest_shift(pooled_s, pooled_q, None if tc is None else tc.transpose(-1, -2))
    e, n, m, frames = best.shape
    e_idx = torch.arange(e, device=best.device)[:, None, None, None]  # (E, 1, 1, 1)
    n_idx = torch.arange(n, device=best.device)[None, :, None, None]  # (1, N, 1, 1)
    m_idx = torch.arange(m, device=best.device)[None, None, :, None]  # (1, 1, M, 1)
    t_idx = torch.arange(frames, device=best.device)  # (T,)
    f_s = pooled_s[e_idx, n_idx, t_idx, best]  # (E, N, M, T, C)
    f_q = pooled_q[e_idx, m_idx, t_idx, best]  # (E, N, M, T, C)
    return f_s, f_q
