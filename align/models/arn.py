"""ARN (Zhang et al., ECCV 2020, "Few-shot action recognition with permutation-invariant
attention") on cached maps: an encoder, a spatial attention that re-weights the encoded maps,
permutation-invariant second-order pooling, and a relation network that scores each
(class prototype, query) pair of pooled matrices.

Follows the evaluation path of the official code (github.com/HongguangZhang/arn-eccv20-master,
eval_arn.py and src/models.py at commit c682474) from the encoder's output on; from the
spatially weighted features on (second-order pooling, shot mean, pairs, relation network) it is
equal to that code (float64 test, values and gradients, 1- and 5-shot:
tests/align/test_official_heads.py):

- attention: ``SpatialDetector`` - Conv3d(d -> 16, 3) BN ReLU, Conv3d(16 -> 16, 3) BN ReLU,
  Conv3d(16 -> 1, 1), sigmoid: one mask over H x W; features x (1 + mask);
- second-order pooling over all T * H * W positions (so the order of positions does not matter:
  the permutation invariance): M = X X^T / (T H W), M / trace(M), then the sigmoid power
  normalisation 2 sigmoid(sigma M) - 1 with sigma = 100;
- prototype: the mean of the shots' pooled matrices;
- ``SimilarityNetwork``: (support, query) matrices as 2 channels, Conv2d(2 -> 64, 3) BN ReLU
  maxpool, then three residual Conv2d(64 -> 64, 3) BN ReLU blocks each followed by maxpool 2,
  Linear(64 * (d / 16)^2 -> 8) ReLU, Linear(8 -> 1).

What does not carry over, written down: ARN's encoder is a C3D-like network trained on pixels,
and its self-supervised tasks (spatial and temporal jigsaws, rotations) act on pixels too - both
are out of reach of a cache of frozen maps. Here the encoder is a learned adapter on the maps:
Conv3d(C -> d, 1) BN ReLU and one Conv3d(d -> d, 3) BN ReLU block as in their encoder, d = 64
(their width). Their detector max-pools time by 2 after each of its two convolution blocks (their
5 steps -> 2 -> 1, defined for their T only); here both blocks run at full T and the maximum over
time follows, for any T (not the same function where theirs is defined). The relation
score is trained with cross-entropy on the pre-sigmoid output (they use a sigmoid and a
mean-squared error; the sigmoid is monotone, so predictions rank the same). Their BatchNorm uses
momentum 1 (running statistics = the last batch); PyTorch's default 0.1 is used here. Their
``weights_init`` draws convolutions from N(0, 2 / (k * k * out)) and Linear weights from
N(0, 0.01) with biases 1; here every layer has PyTorch's default initialisation. A trace
below 1e-12 (an all-zero map) is clamped so that the normalisation stays finite.
"""

from __future__ import annotations

import torch
from torch import nn

from align.models.layers import at_least_fp32
from align.models.learned import LearnedHead, positive_int
from cache import UserError
from cache.options import Range, named_option

SIGMA = 100.0  # their power-normalisation sharpness
TRACE_FLOOR = 1e-12


def conv3d_block(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv3d(c_in, c_out, kernel, padding=kernel // 2), nn.BatchNorm3d(c_out),
            nn.ReLU()]


def second_order(features: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """ARN's pooling of features (n, d, T, H, W) -> (n, d, d): the autocorrelation over all
    positions, trace-normalised, then 2 sigmoid(sigma M) - 1."""
    x = features.flatten(2)  # (n, d, P)
    gram = x @ x.transpose(1, 2) / x.shape[-1]  # (n, d, d)
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(TRACE_FLOOR)  # (n,)
    return 2 * torch.sigmoid(sigma * gram / trace[:, None, None]) - 1  # (n, d, d)


class SpatialAttention(nn.Module):
    """ARN's spatial detector: a (n, 1, 1, H, W) mask in (0, 1) from maps (n, d, T, H, W)."""

    def __init__(self, dim: int = 64, hidden: int = 16):
        super().__init__()
        self.body = nn.Sequential(*conv3d_block(dim, hidden, 3), *conv3d_block(hidden, hidden, 3))
        self.out = nn.Conv3d(hidden, 1, 1)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        pooled = self.body(maps).amax(2, keepdim=True)  # (n, 16, 1, H, W)
        return torch.sigmoid(self.out(pooled))  # (n, 1, 1, H, W)


class RelationNetwork(nn.Module):
    """ARN's ``SimilarityNetwork`` without the final sigmoid: (P, 2, d, d) -> (P,) logits."""

    def __init__(self, dim: int = 64, hidden: int = 8, width: int = 64):
        super().__init__()

        def block(c_in):
            return nn.Sequential(nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width),
                                 nn.ReLU())

        self.layer1, self.layer2, self.layer3, self.layer4 = (block(2), block(width),
                                                              block(width), block(width))
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(width * (dim // 16) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.layer1(pairs))  # (P, 64, d/2, d/2)
        out = self.pool(out + self.layer2(out))  # (P, 64, d/4, d/4)
        out = self.pool(out + self.layer3(out))  # (P, 64, d/8, d/8)
        out = self.pool(out + self.layer4(out))  # (P, 64, d/16, d/16)
        return self.fc2(torch.relu(self.fc1(out.flatten(1)))).squeeze(-1)  # (P,)


class ARNHead(LearnedHead):
    """ARN on cached maps: adapter encoder, spatial attention, second-order pooling, relation
    network.

    Args:
        channels: C of the maps.
        frames: T the head is built for (recorded; it runs on any T, H, W).
        height: H (recorded).
        width: W (recorded).
        shot: K (recorded; any K works).
        dim: d, the encoder's width and the side of the pooled matrices (ARN: 64; >= 16).
        sigma: sharpness of the power normalisation (ARN: 100).
        hidden: width of the relation network's hidden linear layer (ARN: 8).
    """

    kind = "arn"
    OPTIONS = (
        named_option("dim", 64, help="the encoder's width and the side of the pooled matrices",
                     range=Range(16)),
        named_option("sigma", SIGMA, help="sharpness of the power normalisation"),
        named_option("hidden", 8, help="width of the relation network's hidden layer",
                     range=Range(1)),
    )

    def __init__(self, channels: int = 2048, frames: int = 8, height: int = 7, width: int = 7,
                 shot: int = 1, dim: int = 64, sigma: float = SIGMA, hidden: int = 8):
        super().__init__(channels, frames, height, width, shot)
        dim = positive_int(dim, "dim", self.kind, least=16)  # four 2x2 pools in the relation net
        hidden = positive_int(hidden, "hidden", self.kind)
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma > 0:
            raise UserError(f"arn option sigma must be a positive number, not {sigma!r}")
        self.options = {"dim": dim, "sigma": float(sigma), "hidden": hidden}
        self.encoder = nn.Sequential(*conv3d_block(channels, dim, 1), *conv3d_block(dim, dim, 3))
        self.attention = SpatialAttention(dim)
        self.relation = RelationNetwork(dim, hidden)

    def pooled(self, maps: torch.Tensor):
        """Second-order matrices (n, d, d) and attention masks (n, H, W) of maps (n, C, T, H, W)."""
        features = self.encoder(maps)  # (n, d, T, H, W)
        mask = self.attention(features)  # (n, 1, 1, H, W)
        with torch.autocast(maps.device.type, enabled=False):
            weighted = at_least_fp32(features) * (1 + at_least_fp32(mask))  # (n, d, T, H, W)
            return second_order(weighted, self.options["sigma"]), mask[:, 0, 0]

    def _run(self, support, query, way, shot, record):
        """explain keys: ``mask_support`` (way*shot, H, W), ``mask_query`` (M, H, W): the
        spatial attention; ``prototypes`` (N, d, d), ``pooled_query`` (M, d, d)."""
        # support and query pass the encoder separately, as in ARN's code (BatchNorm batches)
        s, s_mask = self.pooled(support)  # (way*shot, d, d), (way*shot, H, W)
        q, q_mask = self.pooled(query)  # (M, d, d), (M, H, W)
        protos = s.view(way, shot, *s.shape[1:]).mean(1)  # (N, d, d)
        m = q.shape[0]
        pairs = torch.stack([protos[None].expand(m, -1, -1, -1),
                             q[:, None].expand(-1, way, -1, -1)], 2)  # (M, N, 2, d, d)
        logits = self.relation(pairs.flatten(0, 1).to(support.dtype)).view(m, way)  # (M, N)
        if record is not None:
            record.update(mask_support=s_mask, mask_query=q_mask, prototypes=protos,
                          pooled_query=q)
        return logits
