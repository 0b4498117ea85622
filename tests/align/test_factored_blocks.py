"""The issue-12 speed-ups of the factored TA2N step, each against its direct form in float64,
values and gradients: time-major shot mixing, case kernels as one matmul, the out-of-place
case terms under autograd, 1x1 projections as one GEMM, masks of +o and -o in one call,
Wk' / Wq' / Wv' before the time mix, the native grouped BatchNorm's gradients, and the
strided max pooling of evaluation."""

import copy

import pytest
import torch
from torch import nn

from align.models.acm import (
    PERTURBATIONS,
    REGION_TAPS,
    SpatialCoordination,
    add_constant_cases,
    axis_weights,
    case_tap_kernels,
    grid_mask,
    offset_mask,
)
from align.models.layers import (
    batch_norm,
    block_max_pool,
    channel_linear,
    mix_time,
    mix_time_major,
)

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 99):
    """Gradients of a fixed random projection of ``out`` (so every output element counts)."""
    weights = rand(*out.shape, seed=seed)
    return torch.autograd.grad((out * weights).sum(), inputs, retain_graph=True)


def assert_same(fast, direct, inputs):
    torch.testing.assert_close(fast, direct, rtol=0, atol=1e-12)
    for a, b in zip(grads(fast, inputs), grads(direct, inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_time_major_shot_mixing_equals_the_einsum():
    mix = rand(2, 3, 5, 4, seed=1).requires_grad_()  # (B, K, T_out, T_in)
    x = rand(6, 7, 4, 3, 2, seed=2).requires_grad_()  # (B*K, C, T_in, H, W)
    direct = torch.einsum("bkts,bkcshw->btchw", mix, x.unflatten(0, (2, 3)))
    fast = mix_time_major(mix, x)  # (B, T_out, C, H, W)
    assert fast.is_contiguous()
    assert_same(fast, direct, [mix, x])
    torch.testing.assert_close(mix_time_major(None, x), x.transpose(1, 2))


def test_case_kernels_equal_the_sums_over_taps_inside_the_map():
    weight = rand(4, 3, 3, 3, 3, seed=3).requires_grad_()  # (O, C, 3, 3, 3)
    taps = torch.tensor(REGION_TAPS, dtype=F64)
    direct = torch.einsum("ocdij,ai,bj->doabc", weight, taps, taps).flatten(1, 3)
    assert_same(case_tap_kernels(weight), direct, [weight])


def test_case_terms_out_of_place_equal_the_in_place_adds():
    """Under autograd the case terms are gathered and added once; without it they are added
    in place: same values, and the gradients equal those of an explicit spread."""
    for kept in ((6, 5), (5, 4)):  # the full 6 x 5 map, and a crop a MaxPool reads
        h = rand(2, 3, *kept, seed=4).requires_grad_()
        cases = rand(2, 3, 3, 3, seed=5).requires_grad_()
        rows = torch.tensor([0, 1, 1, 1, 1, 2])[:kept[0]]
        cols = torch.tensor([0, 1, 1, 1, 2])[:kept[1]]
        direct = h + cases[..., rows, :][..., cols]
        fast = add_constant_cases(h, cases, 6, 5)
        assert_same(fast, direct, [h, cases])
        with torch.no_grad():
            in_place = add_constant_cases(h.detach().clone(), cases.detach(), 6, 5)
        torch.testing.assert_close(in_place, direct.detach(), rtol=0, atol=1e-12)


def test_channel_linear_equals_the_conv1d():
    conv = torch.nn.Conv1d(6, 5, 1).double()
    x = rand(3, 2, 6, 4, seed=6).requires_grad_()  # (..., C, T)
    direct = conv(x.flatten(0, 1)).unflatten(0, (3, 2))
    fast = channel_linear(conv, x)  # (..., C', T)
    assert_same(fast, direct, [x, conv.weight, conv.bias])


def test_projections_before_the_time_mix_equal_after():
    """Wk' (any 1x1 projection) of warped means = the warp of Wk' of the raw means."""
    conv = torch.nn.Conv1d(6, 6, 1, bias=False).double()
    warp = rand(3, 4, 4, seed=7).requires_grad_()  # (n, T, T)
    means = rand(3, 6, 4, seed=8)  # (n, C, T) raw: no gradient
    direct = conv(mix_time(warp, means))
    fast = mix_time(warp, channel_linear(conv, means))
    assert_same(fast, direct, [warp, conv.weight])


def test_square_masks_equal_the_normalised_outer_product():
    offsets = (rand(2, 3, 4, 2, seed=9) * 0.7).requires_grad_()  # (..., 2)
    w_x, w_y = axis_weights(offsets[..., 0], 5), axis_weights(offsets[..., 1], 5)
    mask = w_y.unsqueeze(-1) * w_x.unsqueeze(-2)  # (..., 5, 5)
    direct = mask / mask.sum((-2, -1), keepdim=True)
    assert_same(offset_mask(offsets, 5, 5), direct, [offsets])
    w_x = axis_weights(offsets[..., 0], 5)
    w_y = axis_weights(offsets[..., 1], 6)  # a non-square map takes the per-axis branch
    mask = w_y.unsqueeze(-1) * w_x.unsqueeze(-2)  # (..., 6, 5)
    assert_same(offset_mask(offsets, 6, 5), mask / mask.sum((-2, -1), keepdim=True), [offsets])


def test_pair_masks_of_both_signs_in_one_call_equal_separate_calls():
    for mode in ("mask", "grid"):
        sc = SpatialCoordination(channels=4, mode=mode).double()
        for training in (True, False):
            sc.train(training)
            offsets = (rand(1, 2, 3, 4, 2, seed=10) * 0.6).requires_grad_()  # (E, N, M, T, 2)
            mask_s, mask_q = sc._pair_masks(offsets, 5, 5)
            make = offset_mask if mode == "mask" else grid_mask
            if training:
                steps = torch.tensor(PERTURBATIONS, dtype=F64) * sc.delta
                perturbed = offsets.unsqueeze(-2) + steps  # (..., 9, 2)
                direct_s = make(perturbed, 5, 5).mean(-3)
                direct_q = make(-perturbed, 5, 5).mean(-3)
            else:
                direct_s, direct_q = make(offsets, 5, 5), make(-offsets, 5, 5)
            assert_same(torch.stack([mask_s, mask_q]), torch.stack([direct_s, direct_q]),
                        [offsets])


def test_grouped_batch_norm_gradients_equal_separate_calls():
    bn = torch.nn.BatchNorm3d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    separate = copy.deepcopy(bn)
    x = (rand(3 * 4, 3, 2, 2, 2, seed=11) * 3 + 1).requires_grad_()
    out = batch_norm(bn, x, groups=3)
    expected = torch.cat([separate(chunk) for chunk in x.split(4)])
    assert_same(out, expected, [x])
    for a, b in zip(grads(out, [bn.weight, bn.bias]), grads(expected, [separate.weight,
                                                                        separate.bias])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    for a, b in zip(bn.state_dict().values(), separate.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", [(1, 2, 2), 2, (1, 3, 2), (2, 1, 1)])
@pytest.mark.parametrize("shape", [(3, 4, 8, 6, 6), (2, 3, 5, 7, 5)])
def test_block_max_pool_equals_max_pool3d_without_gradients(kernel, shape):
    """Evaluation's pooling (SC's and TTM's MaxPool3d) as strided maxima: the same values,
    sizes that leave a remainder included; with gradients it is MaxPool3d itself."""
    pool, x = nn.MaxPool3d(kernel), rand(*shape)
    with torch.no_grad():
        assert torch.equal(block_max_pool(pool, x), pool(x))
    x.requires_grad_(True)
    assert_same(block_max_pool(pool, x), pool(x), [x])


def test_block_max_pool_refuses_a_map_smaller_than_its_window_as_max_pool3d_does():
    with torch.no_grad(), pytest.raises(RuntimeError):
        block_max_pool(nn.MaxPool3d(2), rand(1, 2, 4, 1, 4))
