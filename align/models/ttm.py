"""TTM, the temporal transform module: one affine time warp (a, b) per video, and the
linear-interpolation weights it (and SC's grid variant) resample with.

The localisation net reads a (C, T, H, W) map and predicts (a, b); output frame t sits at
u_t = -1 + 2t/(T-1) and reads the input at s_t = a*u_t + b (s = -1 is frame 0, s = +1 frame T-1),
linearly interpolated on the whole C x H x W map. Positions beyond the ends blend with zero
frames, exactly as ``grid_sample(..., padding_mode="zeros", align_corners=True)`` does in the
authors' code; the weights here are an explicit (T, T) matrix so the warp is deterministic on
every device and inspectable.
"""

from __future__ import annotations

import torch
from torch import nn

from align.models.layers import interp_weights, reset_layer


def warp_weights(theta: torch.Tensor, frames: int) -> torch.Tensor:
    """(n, T_out, T_in) weights of the warp s_t = a*u_t + b for ``theta`` (n, 2) = (a, b).

    In frame units the source position is p_t = (s_t + 1)(T-1)/2 = a*t + (1 - a + b)(T-1)/2,
    written this way so (a, b) = (1, 0) lands exactly on the integers (an exact identity).
    """
    theta = theta.to(torch.promote_types(theta.dtype, torch.float32))  # positions need >= fp32
    a, b = theta[:, :1], theta[:, 1:]  # (n, 1)
    t = torch.arange(frames, device=theta.device, dtype=theta.dtype)  # (T,)
    pos = a * t + (1 - a + b) * ((frames - 1) / 2)  # (n, T)
    return interp_weights(pos, frames)  # (n, T, T)


def warp_time(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp maps ``x`` (n, C, T, H, W) in time by ``theta`` (n, 2); returns (n, C, T, H, W)."""
    weights = warp_weights(theta, x.shape[2])  # (n, T, T)
    return torch.einsum("nts,ncshw->ncthw", weights.to(x.dtype), x)  # (n, C, T, H, W)


class TemporalTransform(nn.Module):
    """Predicts (a, b) = tanh(locnet(x)) per video and warps the video in time.

    Layer order (and so the ``locnet.<i>`` indices) is the authors': Conv3d, BN, MaxPool3d(2),
    ReLU, Conv3d, BN, MaxPool3d(2), ReLU, global max pool, Flatten, Linear, ReLU, Linear, Tanh.
    The last Linear starts at zero weight and bias (2, 0): (a, b) = (tanh 2, 0), near identity.

    Args:
        channels: C of the input maps.
        hidden: channels of the two Conv3d layers.
        fc: width of the hidden Linear layer.
    """

    def __init__(self, channels: int = 2048, hidden: tuple[int, int] = (64, 128), fc: int = 32):
        super().__init__()
        self.locnet = nn.Sequential(
            nn.Conv3d(channels, hidden[0], 3, padding=1),
            nn.BatchNorm3d(hidden[0]),
            nn.MaxPool3d(2),
            nn.ReLU(),
            nn.Conv3d(hidden[0], hidden[1], 3, padding=1),
            nn.BatchNorm3d(hidden[1]),
            nn.MaxPool3d(2),
            nn.ReLU(),
            nn.AdaptiveMaxPool3d(1),
            nn.Flatten(),
            nn.Linear(hidden[1], fc),
            nn.ReLU(),
            nn.Linear(fc, 2),
            nn.Tanh(),
        )
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's default init drawn from ``generator``; the last Linear at (0, bias (2, 0))."""
        for layer in self.locnet:
            reset_layer(layer, generator)
        last = self.locnet[-2]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor([2.0, 0.0]))

    def params(self, x: torch.Tensor) -> torch.Tensor:
        """(a, b) per video: (n, 2) for maps (n, C, T, H, W)."""
        return self.locnet(x)  # (n, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Warped maps (n, C, T, H, W) and their (a, b) (n, 2)."""
        theta = self.params(x)  # (n, 2)
        return warp_time(x, theta), theta  # (n, C, T, H, W), (n, 2)
