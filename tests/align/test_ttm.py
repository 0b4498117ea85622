"""TTM: the (a, b) time warp, its identity cases and its agreement with the authors' grid_sample."""

import math

import pytest
import torch
import torch.nn.functional as F

from align.models.ttm import TemporalTransform, interp_weights, warp_time


def maps(n=3, c=8, t=6, h=4, w=4, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, t, h, w, generator=gen, dtype=dtype)


def manual_warp(x, a, b):
    """Frame t reads s = a*u_t + b, linearly interpolated, zero frames beyond the ends."""
    t_len = x.shape[2]
    out = torch.zeros_like(x)
    for t in range(t_len):
        u = -1 + 2 * t / (t_len - 1)
        pos = ((a * u + b) + 1) * (t_len - 1) / 2
        lo = math.floor(pos)
        frac = pos - lo
        for k, weight in ((lo, 1 - frac), (lo + 1, frac)):
            if 0 <= k < t_len:
                out[:, :, t] += weight * x[:, :, k]
    return out


def authors_warp(x, theta):
    """The authors' TTM warp: grid_sample over (n, C*H*W, 1, T), align_corners, zero padding."""
    n, c, t, h, w = x.shape
    u = torch.linspace(-1, 1, t, dtype=x.dtype).expand(n, t)
    s = theta[:, :1] * u + theta[:, 1:]  # (n, T)
    grid = torch.stack([s, torch.full_like(s, -1.0)], -1)[:, None]  # (n, 1, T, 2)
    flat = x.transpose(1, 2).reshape(n, t, -1).transpose(1, 2)[:, :, None]  # (n, CHW, 1, T)
    out = F.grid_sample(flat, grid, align_corners=True)  # (n, CHW, 1, T)
    return out[:, :, 0].transpose(1, 2).reshape(n, t, c, h, w).transpose(1, 2)


def test_init_is_near_identity():
    ttm = TemporalTransform(channels=8)
    x = maps()
    warped, theta = ttm(x)
    expected_theta = torch.tensor([math.tanh(2.0), 0.0]).expand(3, 2)
    torch.testing.assert_close(theta, expected_theta)
    torch.testing.assert_close(warped, manual_warp(x, math.tanh(2.0), 0.0))
    # close to the input: the warp moves frames by at most (1 - tanh 2)(T-1)/2 = 0.09 frames
    assert (warped - x).norm() < 0.2 * x.norm()


def test_identity_parameters_give_the_input_exactly():
    x = maps(t=7)
    theta = torch.tensor([[1.0, 0.0]]).expand(3, 2)
    assert torch.equal(warp_time(x, theta), x)


@pytest.mark.parametrize("a, b", [(0.5, 0.0), (1.0, 0.5), (-1.0, 0.0), (0.3, -0.9)])
def test_warp_against_hand_computed_interpolation(a, b):
    x = maps(t=5)
    theta = torch.tensor([[a, b]]).expand(3, 2)
    torch.testing.assert_close(warp_time(x, theta), manual_warp(x, a, b))


def test_half_speed_and_shift_by_hand():
    x = torch.arange(1.0, 6.0).view(1, 1, 5, 1, 1).expand(1, 2, 5, 4, 4)  # frame k holds k + 1
    half = warp_time(x, torch.tensor([[0.5, 0.0]]))[0, 0, :, 0, 0]
    torch.testing.assert_close(half, torch.tensor([2.0, 2.5, 3.0, 3.5, 4.0]))
    # b = 0.5 is one frame later for T = 5; the last frame reads past the end: zero
    shifted = warp_time(x, torch.tensor([[1.0, 0.5]]))[0, 0, :, 0, 0]
    torch.testing.assert_close(shifted, torch.tensor([2.0, 3.0, 4.0, 5.0, 0.0]))


def test_matches_authors_grid_sample_in_value_and_gradient():
    x = maps(t=8, dtype=torch.float64)
    theta = torch.tensor([[0.8, 0.13], [0.5, -0.7], [1.0, 0.31]], dtype=torch.float64)
    ours_t = theta.clone().requires_grad_()
    theirs_t = theta.clone().requires_grad_()
    ours = warp_time(x, ours_t)
    theirs = authors_warp(x, theirs_t)
    torch.testing.assert_close(ours, theirs)
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    torch.testing.assert_close(ours_t.grad, theirs_t.grad)


def test_interp_weights_drop_samples_outside():
    w = interp_weights(torch.tensor([-0.5, 0.25, 3.5, 4.0]), 4)
    expected = torch.tensor([[0.5, 0, 0, 0], [0.75, 0.25, 0, 0], [0, 0, 0, 0.5], [0, 0, 0, 0]])
    torch.testing.assert_close(w, expected)


def test_gradients_reach_the_warp_parameters():
    ttm = TemporalTransform(channels=8)
    x = maps(t=4)
    warped, _ = ttm(x)
    (warped * torch.randn_like(warped)).sum().backward()
    last = ttm.locnet[-2]
    assert last.weight.grad.abs().sum() > 0 and last.bias.grad.abs().sum() > 0
