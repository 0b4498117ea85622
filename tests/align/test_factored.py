"""The factored TA2N and the batched entry points: equal to the authors' direct form in value,
gradient and BatchNorm statistics (float64), per-video precompute + scoring equal to the forward
(float32 1e-4, float64 1e-10), batched episodes equal to the loop for every head, and the
algebra's building blocks (tap convolutions, grouped BatchNorm, trimmed convolutions)."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from align.models import build_head
from align.models.acm import case_tap_kernels, constant_taps, spread_constant
from align.models.base import Head
from align.models.layers import (
    batch_norm,
    conv3d_kept,
    mix_time,
    run_layers,
    tap_convs,
    tap_mix,
)
from align.models.ttm import TemporalTransform

F64 = torch.float64
SWITCHES = [dict(ttm=a, tc=b, sc=c, sc_mode=mode)
            for a, b, c in itertools.product([False, True], repeat=3)
            for mode in (["mask", "grid", "enumerate"] if c else ["mask"])]


def switch_id(s: dict) -> str:
    on = [k for k in ("ttm", "tc", "sc") if s[k]] + ([s["sc_mode"]] if s["sc"] else [])
    return "-".join(on) or "none"


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def awake(head, seed=5):
    """Non-zero last layers (TTM warps and SC offsets away from their identity start) and
    BatchNorm running statistics away from their init, so every term is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in (head.ttm, head.sc):
            seq = getattr(part, "locnet", None) or getattr(part, "mvnet", None)
            if seq is not None:
                last = seq[-2]
                last.weight.copy_(torch.randn(last.weight.shape, generator=gen,
                                              dtype=last.weight.dtype) * 0.5)
        for module in head.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    return head


def ta2n(switches, shot, dtype, c=5, t=4, h=5, w=5):
    """A head on odd-sized maps (H = W = 5: eval drops a row and a column)."""
    head = build_head("ta2n", channels=c, frames=t, height=h, width=w, shot=shot, **switches)
    return awake(head.to(dtype))


def episodes(e, way, shot, queries, dtype, c=5, t=4, h=5, w=5, seed=1):
    support = rand(e, way * shot, c, t, h, w, seed=seed, dtype=dtype).relu()
    query = rand(e, queries, c, t, h, w, seed=seed + 1, dtype=dtype).relu()
    return support, query


def states(head, maps, shot):
    """Per-video states of (E, n, ...) maps, reshaped to (E, n, ...)."""
    flat = head.precompute(maps.flatten(0, 1), shot)
    return {k: v.unflatten(0, maps.shape[:2]) for k, v in flat.items()}


# ------------------------------------------------------------------------------ TA2N exactness
@pytest.mark.parametrize("switches", SWITCHES, ids=switch_id)
@pytest.mark.parametrize("shot", [1, 2])
def test_factored_training_equals_the_direct_form(switches, shot):
    """Batched factored forward of 2 episodes in training mode = the authors' direct form run
    episode by episode: logits, gradients of every parameter and of the inputs, and the
    BatchNorm running statistics, in float64."""
    head = ta2n(switches, shot, F64).train()
    direct = copy.deepcopy(head).set_path("direct")
    support, query = episodes(2, 2, shot, 3, F64)
    inputs = [support.requires_grad_(), query.requires_grad_()]
    out = head.forward_episodes(*inputs, 2, shot)  # (E, M, way)
    expected = torch.stack([direct(s, q, 2, shot) for s, q in zip(*inputs)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=F64).view_as(out)
    params = [p for p in head.parameters()]
    if not params:
        return
    got = torch.autograd.grad((out * weights).sum(), params + inputs)
    want = torch.autograd.grad((expected * weights).sum(), list(direct.parameters()) + inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for (name, a), b in zip(head.state_dict().items(), direct.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("switches", SWITCHES, ids=switch_id)
@pytest.mark.parametrize("shot", [1, 5])
def test_precomputed_scores_equal_the_forward(switches, shot):
    """Eval mode: per-video states + score_episodes give the direct form's logits, 1e-10 in
    float64 and 1e-4 in float32; so does the factored forward itself."""
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-4)):
        head = ta2n(switches, shot, dtype).eval()
        direct = copy.deepcopy(head).set_path("direct")
        support, query = episodes(2, 2, shot, 3, dtype, seed=3)
        with torch.no_grad():
            expected = torch.stack([direct(s, q, 2, shot) for s, q in zip(support, query)])
            scored = head.score_episodes(states(head, support, shot),
                                         states(head, query, shot), 2, shot)
            forward = head.forward_episodes(support, query, 2, shot)
        torch.testing.assert_close(scored, expected, rtol=0, atol=tol)
        torch.testing.assert_close(forward, expected, rtol=0, atol=tol)
        assert scored.dtype == dtype


def test_precompute_needs_eval_mode_and_states_are_per_video():
    head = ta2n(SWITCHES[-2], 2, torch.float32)  # ttm-tc-sc-mask
    maps = episodes(1, 3, 2, 1, torch.float32)[0][0]  # (6, C, T, H, W)
    with pytest.raises(ValueError, match="eval mode"):
        head.train().precompute(maps, 2)
    head.eval()
    with torch.no_grad():
        together = head.precompute(maps, 2)
        alone = head.precompute(maps[2:3], 2)
    assert {k: tuple(v.shape[1:]) for k, v in together.items()}["support_taps"] == (
        3, 4, 128, 4, 4)  # the first MaxPool reads 4 x 4 of the 5 x 5 outputs: only those
    for key, value in alone.items():  # a video's state does not depend on its neighbours
        torch.testing.assert_close(value[0], together[key][2], msg=key)


# ------------------------------------------------------------------------------ every head
@pytest.mark.parametrize("kind", ["ta2n", "protonet", "otam"])
def test_batched_episodes_equal_the_loop(kind):
    """forward_episodes of 3 episodes = 3 calls, values and gradients; score_episodes from
    precomputed states = the loop too (float32)."""
    head = build_head(kind, channels=8, frames=5, height=5, width=5, shot=2)
    if kind == "ta2n":
        awake(head)
    support, query = episodes(3, 3, 2, 4, torch.float32, c=8, h=5, w=5, seed=7)
    support.requires_grad_()
    out = head.train().forward_episodes(support, query, 3, 2)
    loop = torch.stack([copy.deepcopy(head)(s, q, 3, 2) for s, q in zip(support, query)])
    torch.testing.assert_close(out, loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(out.pow(2).sum(), support)[0],
                               torch.autograd.grad(loop.pow(2).sum(), support)[0],
                               rtol=1e-4, atol=1e-6)
    head.eval()
    with torch.no_grad():
        loop = torch.stack([head(s, q, 3, 2) for s, q in zip(support, query)])
        scored = head.score_episodes(states(head, support, 2), states(head, query, 2), 3, 2)
    torch.testing.assert_close(scored, loop, rtol=1e-5, atol=1e-5)
    assert head.precomputes


def test_a_head_with_only_forward_keeps_working():
    """The base class's defaults: no precompute (evaluation streams maps), state = the maps,
    scoring = forward_episodes = a loop over forward."""

    class MeanHead(Head):
        kind = "mean"

        def forward(self, support, query, way, shot):
            protos = support.mean((-3, -2, -1)).view(way, shot, -1).mean(1)  # (way, C)
            return -torch.cdist(query.mean((-3, -2, -1)), protos)  # (M, way)

    head = MeanHead(channels=4, frames=4, height=3, width=3)
    support, query = episodes(2, 2, 1, 3, torch.float32, c=4, t=4, h=3, w=3)
    assert not head.precomputes
    loop = torch.stack([head(s, q, 2, 1) for s, q in zip(support, query)])
    torch.testing.assert_close(head.forward_episodes(support, query, 2, 1), loop)
    torch.testing.assert_close(
        head.score_episodes(states(head, support, 1), states(head, query, 1), 2, 1), loop)


# ------------------------------------------------------------------------------ building blocks
def test_tap_convs_of_unmixed_maps_give_the_conv_of_mixed_maps():
    """conv3d(M x) = tap_mix(M, taps(x)) for any time mixing M, also on kept positions."""
    x = rand(3, 4, 6, 5, 7, seed=1, dtype=F64)
    weight = rand(2, 4, 3, 3, 3, seed=2, dtype=F64)
    mix = rand(3, 6, 6, seed=3, dtype=F64)
    direct = F.conv3d(mix_time(mix, x), weight, padding=1)  # (3, 2, 6, 5, 7)
    torch.testing.assert_close(tap_mix(mix, tap_convs(x, weight)), direct)
    torch.testing.assert_close(tap_mix(None, tap_convs(x, weight)),
                               F.conv3d(x, weight, padding=1))
    torch.testing.assert_close(tap_mix(mix, tap_convs(x, weight, keep=(4, 6))),
                               direct[..., :4, :6])
    torch.testing.assert_close(conv3d_kept(x, weight, None, (1, 1, 1), (2, 3)),
                               F.conv3d(x, weight, padding=1)[..., :2, :3])


def test_case_taps_give_the_conv_of_constant_maps_after_time_mixing():
    values = rand(2, 4, 6, seed=4, dtype=F64)  # (n, C, T)
    weight = rand(3, 4, 3, 3, 3, seed=5, dtype=F64)
    mix = rand(2, 6, 6, seed=6, dtype=F64)
    mixed = torch.einsum("nts,ncs->nct", mix, values)  # (n, C, T)
    full = mixed[..., None, None].expand(2, 4, 6, 5, 4)
    expected = F.conv3d(full, weight, padding=1)  # (n, O, T, H, W)
    taps = constant_taps(values, case_tap_kernels(weight))  # (n, 3, 9 O, T)
    torch.testing.assert_close(spread_constant(tap_mix(mix, taps), 5, 4), expected)
    torch.testing.assert_close(spread_constant(tap_mix(mix, taps), 5, 4, (4, 2)),
                               expected[..., :4, :2])


def test_grouped_batch_norm_equals_separate_calls():
    bn = torch.nn.BatchNorm3d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    separate = copy.deepcopy(bn)
    x = rand(3 * 4, 3, 2, 2, 2, seed=8, dtype=F64) * 3 + 1
    out = batch_norm(bn, x, groups=3)
    expected = torch.cat([separate(chunk) for chunk in x.split(4)])
    torch.testing.assert_close(out, expected)
    for a, b in zip(bn.state_dict().values(), separate.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert int(bn.num_batches_tracked) == 3
    bn.eval()
    separate.eval()
    torch.testing.assert_close(batch_norm(bn, x, groups=3), separate(x))


def test_eval_locnet_computes_only_what_its_pooling_reads():
    """run_layers on TTM's locnet: equal to the Sequential in both modes; in eval the convs
    before a row-dropping MaxPool compute the kept positions only (fewer FLOPs)."""
    ttm = TemporalTransform(channels=4).double()
    awake_ttm = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ttm.locnet[-2].weight.copy_(torch.randn(2, 32, generator=awake_ttm, dtype=F64))
    x = rand(3, 4, 8, 7, 7, seed=9, dtype=F64)
    torch.testing.assert_close(run_layers(ttm.locnet, x), copy.deepcopy(ttm).locnet(x))
    ttm.eval()
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as kept:
        out = run_layers(ttm.locnet, x)
    with FlopCounterMode(display=False) as full:
        expected = ttm.locnet(x)
    torch.testing.assert_close(out, expected)
    assert kept.get_total_flops() < 0.8 * full.get_total_flops()


# ------------------------------------------------------------------------------ compile
@pytest.mark.slow
def test_compiled_head_gives_the_same_results_aot_eager():
    """torch.compile (dynamo + AOT autograd) of the training and evaluation entry points."""
    head = ta2n(SWITCHES[-2], 2, torch.float32)
    support, query = episodes(2, 3, 2, 4, torch.float32, seed=11)
    compiled = copy.deepcopy(head).compile_entry_points(backend="aot_eager")
    out, expected = (h.train().forward_episodes(support, query, 3, 2) for h in (compiled, head))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(out.sum(), list(compiled.parameters())),
                    torch.autograd.grad(expected.sum(), list(head.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    compiled.eval()
    head.eval()
    with torch.no_grad():
        scored = compiled.score_episodes(states(compiled, support, 2),
                                         states(compiled, query, 2), 3, 2)
        torch.testing.assert_close(scored, head.forward_episodes(support, query, 3, 2),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_head_gives_the_same_results_inductor():
    """The default backend (C++ code generated on the CPU): evaluation's entry points
    (training's take minutes to compile on a 2-core machine)."""
    head = ta2n(SWITCHES[-2], 1, torch.float32).eval()
    support, query = episodes(2, 3, 1, 4, torch.float32, seed=12)
    compiled = copy.deepcopy(head).compile_entry_points()
    with torch.no_grad():
        scored = compiled.score_episodes(states(compiled, support, 1),
                                         states(compiled, query, 1), 3, 1)
        torch.testing.assert_close(scored, head.forward_episodes(support, query, 3, 1),
                                   rtol=1e-5, atol=1e-5)
