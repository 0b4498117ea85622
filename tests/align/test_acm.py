"""ACM: TC attention and residuals, the SC mask formula, perturbation, the grid and enumerate
variants, and the fast path equal to the direct form in value and gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

from align.models.acm import (
    PERTURBATIONS,
    SpatialCoordination,
    TemporalCoordination,
    _constant_map_conv,
    axis_weights,
    grid_axis_weights,
    grid_mask,
    offset_mask,
)
from align.models.layers import frame_cosine_distance


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randomise_offsets(sc: SpatialCoordination, seed=1, std=1.0):
    """The predictor's last layer starts at zero (offsets 0); give it weights for the tests."""
    with torch.no_grad():
        last = sc.mvnet[-2]
        last.weight.copy_(rand(*last.weight.shape, seed=seed, dtype=last.weight.dtype) * std)
        last.bias.copy_(rand(*last.bias.shape, seed=seed + 1, dtype=last.bias.dtype) * 0.3)


# ------------------------------------------------------------------------------ TC
def test_temporal_coordination_against_loops():
    tc_mod = TemporalCoordination(channels=6)
    s, q = rand(2, 6, 4, 3, 3, seed=1), rand(3, 6, 4, 3, 3, seed=2)
    support_t, tc, attn = tc_mod(s, q)
    wk, wq, wv = (m.weight[:, :, 0] for m in (tc_mod.keynet, tc_mod.querynet, tc_mod.valuenet))
    g_s, g_q = s.mean((-2, -1)), q.mean((-2, -1))
    for n in range(2):
        for m in range(3):
            logits = torch.zeros(4, 4)
            for x in range(4):
                for y in range(4):
                    logits[x, y] = (wk @ g_s[n, :, x]) @ (wq @ g_q[m, :, y]) / math.sqrt(6)
            a = logits.softmax(-1)  # over query time y
            torch.testing.assert_close(attn[n, m], a)
            expected = torch.stack([sum(a[x, y] * (wv @ g_q[m, :, y]) for y in range(4))
                                    for x in range(4)], -1)  # (C, T)
            torch.testing.assert_close(tc[n, m], expected)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 4))
    residual = torch.einsum("oc,nct->not", wv, g_s)[..., None, None]
    torch.testing.assert_close(support_t, s + residual)


# ------------------------------------------------------------------------------ masks
def test_axis_weights_at_zero_offset_are_all_ones():
    torch.testing.assert_close(axis_weights(torch.tensor(0.0), 5), torch.ones(5))
    torch.testing.assert_close(axis_weights(torch.tensor(0.0), 7), torch.ones(7))


def test_axis_weights_at_shifted_offsets_by_hand():
    # L = 5, o = 0.25: g = -0.75 -0.25 0.25 0.75 1.25; the last is 0.25 past the edge:
    # 1 - 0.25 * (L-1)/2 = 0.5
    torch.testing.assert_close(axis_weights(torch.tensor(0.25), 5),
                               torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5]))
    # o = -0.6: g = -1.6 -1.1 -0.6 -0.1 0.4 -> max(0, 1 - 1.2) = 0, 1 - 0.2 = 0.8
    torch.testing.assert_close(axis_weights(torch.tensor(-0.6), 5),
                               torch.tensor([0.0, 0.8, 1.0, 1.0, 1.0]))
    # a whole pixel (2 / (L-1) = 0.5) drops the first column: ramp reaches 0 there
    torch.testing.assert_close(axis_weights(torch.tensor(-0.5), 5),
                               torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0]))


def test_offset_mask_by_hand_x_along_width():
    mask = offset_mask(torch.tensor([0.25, -0.6]), 5, 5)  # (ox, oy)
    w_x = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5])
    w_y = torch.tensor([0.0, 0.8, 1.0, 1.0, 1.0])
    expected = w_y[:, None] * w_x[None, :] / (4.5 * 3.8)
    torch.testing.assert_close(mask, expected)
    torch.testing.assert_close(offset_mask(torch.zeros(2), 4, 6), torch.full((4, 6), 1 / 24))


def test_grid_variant_by_hand():
    # o = 0.25 on L = 5: 5 points evenly over the overlap [-1, 0.75] sit at pixels
    # 0, 0.875, 1.75, 2.625, 3.5; their bilinear weights averaged:
    expected = torch.tensor([1.125, 1.125, 1.125, 1.125, 0.5]) / 5
    torch.testing.assert_close(grid_axis_weights(torch.tensor(0.25), 5), expected)
    # no offset: the plain mean, like the mask
    torch.testing.assert_close(grid_mask(torch.zeros(2), 5, 5), offset_mask(torch.zeros(2), 5, 5))


# ------------------------------------------------------------------------------ SC
def test_perturbation_in_training_only_and_decay_halves_it():
    sc = SpatialCoordination(channels=4)  # offsets start at 0
    s, q = rand(2, 4, 3, 5, 5, seed=3), rand(3, 4, 3, 5, 5, seed=4)
    sc.eval()
    f_s, _, offsets = sc(s, q, None)
    assert torch.equal(offsets, torch.zeros(2, 3, 3, 2))
    torch.testing.assert_close(f_s, s.mean((-2, -1))[:, None].expand(2, 3, 4, 3))

    def perturbed_mean(delta):
        steps = torch.tensor(PERTURBATIONS, dtype=torch.float32) * delta
        mask = offset_mask(steps, 5, 5).mean(0)  # (H, W)
        return torch.einsum("hw,ncthw->nct", mask, s)[:, None].expand(2, 3, 4, 3)

    sc.train()
    f_s, _, _ = sc(s, q, None)
    torch.testing.assert_close(f_s, perturbed_mean(0.2))
    assert not torch.allclose(f_s, s.mean((-2, -1))[:, None].expand(2, 3, 4, 3))
    sc.decay()
    assert sc.delta.item() == pytest.approx(0.1)
    f_s, _, _ = sc(s, q, None)
    torch.testing.assert_close(f_s, perturbed_mean(0.1))
    assert "delta" in sc.state_dict()


def test_query_mask_uses_the_opposite_offset():
    sc = SpatialCoordination(channels=4).eval()
    randomise_offsets(sc)
    s, q = rand(2, 4, 3, 5, 5, seed=5), rand(3, 4, 3, 5, 5, seed=6)
    f_s, f_q, offsets = sc(s, q, None)
    assert offsets.abs().max() > 0.05 and offsets.abs().max() <= 0.75
    mask_s, mask_q = offset_mask(offsets, 5, 5), offset_mask(-offsets, 5, 5)  # (N, M, T, H, W)
    torch.testing.assert_close(f_s, torch.einsum("nmthw,ncthw->nmct", mask_s, s))
    torch.testing.assert_close(f_q, torch.einsum("nmthw,mcthw->nmct", mask_q, q))


def test_constant_map_conv_equals_conv_of_the_broadcast_map():
    tc = rand(2, 3, 5, 4, seed=7, dtype=torch.float64)  # (N, M, C, T)
    weight = rand(6, 5, 3, 3, 3, seed=8, dtype=torch.float64)
    fast = _constant_map_conv(tc, weight, 4, 6)  # (N, M, K, T, H, W)
    full = tc[..., None, None].expand(2, 3, 5, 4, 4, 6).reshape(6, 5, 4, 4, 6)
    direct = F.conv3d(full, weight, padding=1).view(2, 3, 6, 4, 4, 6)
    torch.testing.assert_close(fast, direct)


@pytest.mark.parametrize("mode, with_tc, training", [
    ("mask", True, True), ("mask", False, False), ("grid", True, False), ("grid", False, True)])
def test_fast_path_equals_direct_form(mode, with_tc, training):
    sc = SpatialCoordination(channels=5, mode=mode).double().train(training)
    randomise_offsets(sc)
    s = rand(2, 5, 3, 5, 4, seed=9, dtype=torch.float64).requires_grad_()
    q = rand(3, 5, 3, 5, 4, seed=10, dtype=torch.float64).requires_grad_()
    tc = rand(2, 3, 5, 3, seed=11, dtype=torch.float64).requires_grad_() if with_tc else None
    inputs = [s, q] + ([tc] if with_tc else [])
    results = []
    for fast in (False, True):
        sc.fast = fast
        f_s, f_q, offsets = sc(s, q, tc)
        loss = frame_cosine_distance(f_s, f_q).pow(2).sum()
        grads = torch.autograd.grad(loss, inputs + list(sc.parameters()))
        results.append((f_s, f_q, offsets, grads))
    (ds, dq, do, dg), (fs, fq, fo, fg) = results
    assert do.abs().max() > 0.05  # the test exercises non-zero offsets
    torch.testing.assert_close(fs, ds)
    torch.testing.assert_close(fq, dq)
    torch.testing.assert_close(fo, do)
    for a, b in zip(fg, dg):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ enumerate
def brute_force_enumerate(s, q_pairs):
    """min over integer shifts (dx, dy) of the frame cosine distance of the overlaps' means."""
    n, m, _, t, h, w = q_pairs.shape
    best = torch.full((n, m, t), float("inf"), dtype=s.dtype)
    for dy in range(-(h - 1), h):
        for dx in range(-(w - 1), w):
            ys, xs = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
            yq, xq = slice(max(0, dy), h - max(0, -dy)), slice(max(0, dx), w - max(0, -dx))
            f_s = s[..., ys, xs].mean((-2, -1))[:, None]  # (N, 1, C, T)
            f_q = q_pairs[..., yq, xq].mean((-2, -1))  # (N, M, C, T)
            dist = 1 - F.cosine_similarity(f_s, f_q, dim=2, eps=1e-12)  # (N, M, T)
            best = torch.minimum(best, dist)
    return best.sum(-1)  # (N, M)


@pytest.mark.parametrize("with_tc", [True, False])
def test_enumerate_keeps_the_smallest_distance_per_frame(with_tc):
    sc = SpatialCoordination(channels=4, mode="enumerate")
    s, q = rand(2, 4, 3, 4, 5, seed=12, dtype=torch.float64), rand(3, 4, 3, 4, 5, seed=13,
                                                                      dtype=torch.float64)
    tc = rand(2, 3, 4, 3, seed=14, dtype=torch.float64) if with_tc else None
    f_s, f_q, _ = sc(s, q, tc)
    q_pairs = q[None].expand(2, 3, 4, 3, 4, 5) + (0 if tc is None else tc[..., None, None])
    torch.testing.assert_close(frame_cosine_distance(f_s, f_q), brute_force_enumerate(s, q_pairs))


def test_enumerate_finds_a_translation():
    # the query is the support with its content moved by dx = +1, dy = -2 pixels
    s = rand(1, 6, 2, 5, 5, seed=15).relu()
    q = rand(1, 6, 2, 5, 5, seed=16).relu()
    q[..., 0:3, 1:5] = s[..., 2:5, 0:4]
    sc = SpatialCoordination(channels=6, mode="enumerate")
    f_s, f_q, offsets = sc(s, q, None)
    torch.testing.assert_close(offsets[0, 0], torch.tensor([[0.5, -1.0]] * 2))  # 2 px / 4 = 1
    torch.testing.assert_close(frame_cosine_distance(f_s, f_q), torch.zeros(1, 1),
                               atol=1e-5, rtol=0)
