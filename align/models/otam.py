"""OTAM (Cao et al. 2020) ordered temporal alignment: the soft-min cumulative path distance
between two frame sequences, and the training-free ``otam`` head built on it.

The frame cosine-distance matrix D (rows: one sequence's frames, columns: the other's) gets a
zero column at both ends of the column axis. A path runs from the top-left to the bottom-right
corner moving right or diagonally; in the padded first and last columns and in the first real
column it may also move down, so it can skip rows at the start and at the end for free. The
cumulative cost uses a soft minimum min_lambda(x) = -lambda * logsumexp(-x / lambda) with
lambda = 0.1. The head sums both directions (rows = query, then rows = support) and averages
over the shots of a class.

Equal (float64 test, values and gradients, 1- and 5-shot: tests/align/test_official_heads.py)
to ``CNN_OTAM`` of tobyperrett/few-shot-action-recognition (model.py at commit 3687f3a, lines
236-296; the OTAM paper released no code) on the backbone's pooled frame features, including
its two details the paper does not state:

- the cosine adds 0.01 to the denominator (``cos_sim(x, y, epsilon=0.01)``, utils.py at commit
  0b5b5b8, lines 8-17): 1 - <x, y> / (|x| |y| + 0.01), so frames with small norms look less
  alike (a zero frame is at distance 1 from everything, as there);
- in the first real column a path may also move down (``OTAM_cum_dist``, model.py line 256:
  ``cum_dists[:, :, l - 1, 1]`` among the soft-min's terms), as in the padded last column
  (line 264).

One difference in arithmetic, not in value: their soft minimum is ``log(sum(exp(-x / lambda)))``,
whose terms underflow to 0 in float32 once every path cost in it passes ~10 (exp(-104) is below
float32's smallest number), so the log is -inf and the cost inf - long videos (T = 16) get
there; here it is a logsumexp (the same value, finite in float32); and
their cumulative matrix is always float32 where this one keeps the input's dtype (float64 in
the equality test). Before this matched the official code (README's Table 2 columns marked
"equal budget"), the cosine had no epsilon and the first real column no down move.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.models.layers import at_least_fp32
from align.models.protonet import ProtoNetHead
from cache.options import named_option

LAMBDA = 0.1
COS_EPSILON = 0.01  # their cos_sim's epsilon, added to |x| |y|


def frame_distances(query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """1 - <q, s> / (|q| |s| + 0.01) of every query frame q with every support frame s.

    query (..., M, C, T), support (..., S, C, T) -> (..., M, S, T_query, T_support); the
    leading dims (episodes) are optional.
    """
    # in float32 even under autocast: the soft-min path sums these, and ranks classes by it
    with torch.autocast(query.device.type, enabled=False):
        dtype = torch.promote_types(query.dtype, torch.float32)
        q, s = query.to(dtype), support.to(dtype)  # (..., M, C, T), (..., S, C, T)
        dots = torch.einsum("...mcx,...scy->...msxy", q, s)  # (..., M, S, T, T)
        q_norm = q.norm(dim=-2)[..., :, None, :, None]  # (..., M, 1, T, 1)
        s_norm = s.norm(dim=-2)[..., None, :, None, :]  # (..., 1, S, 1, T)
        return 1 - dots / (q_norm * s_norm + COS_EPSILON)  # (..., M, S, T, T)


def soft_min(values: list[torch.Tensor], lam: float = LAMBDA) -> torch.Tensor:
    """-lam * logsumexp(-v / lam) over a list of equally shaped tensors."""
    return -lam * torch.logsumexp(torch.stack(values) / -lam, dim=0)


def cumulative_alignment(dist: torch.Tensor, lam: float = LAMBDA) -> torch.Tensor:
    """Soft-min OTAM path cost of ``dist`` (..., R, S) with zero columns padded at both ends.

    Row 0 can only move right; in the padded first and last columns and in the first real
    column a path may also move down; elsewhere it moves right or diagonally. Returns (...,)
    the cost at the last row of the last (padded) column.
    """
    rows = dist.shape[-2]
    padded = F.pad(dist, (1, 1))  # (..., R, S + 2)
    cols = padded.shape[-1]
    prev = list(padded[..., 0, :].cumsum(-1).unbind(-1))  # row 0: right moves only
    for i in range(1, rows):
        cur = [padded[..., i, 0] + prev[0]]  # first padded column: down only
        for j in range(1, cols):
            options = [prev[j - 1], cur[j - 1]]  # diagonal, right
            if j in (1, cols - 1):
                options.append(prev[j])  # down: the first real and the last padded column
            cur.append(padded[..., i, j] + soft_min(options, lam))
        prev = cur
    return prev[-1]  # (...,)


def otam_distance(query: torch.Tensor, support: torch.Tensor, lam: float = LAMBDA) -> torch.Tensor:
    """Both-direction OTAM distance of every query (..., M, C, T) to every support video
    (..., S, C, T).

    Returns (..., M, S): alignment with the support axis padded plus alignment with the query axis
    padded.
    """
    dist = frame_distances(query, support)  # (..., M, S, T, T)
    forward = cumulative_alignment(dist, lam)  # (..., M, S) rows = query frames
    backward = cumulative_alignment(dist.transpose(-1, -2), lam)  # rows = support frames
    return forward + backward


class OTAMHead(ProtoNetHead):
    """OTAM: per frame spatial means, both-direction soft-min ordered temporal alignment
    (lambda 0.1) of each query with each support video, averaged over a class's shots.
    Training-free on frozen maps.

    Args:
        channels: C of the maps (recorded).
        frames: T (recorded).
        height: H (recorded).
        width: W (recorded).
        shot: K (recorded).
        lam: the soft-min temperature.
    """

    kind = "otam"
    OPTIONS = (named_option("lam", LAMBDA, help="the soft-min temperature"),)

    def __init__(self, channels: int = 2048, frames: int = 8, height: int = 7, width: int = 7,
                 shot: int = 1, lam: float = LAMBDA):
        super().__init__(channels, frames, height, width, shot)
        self.lam = float(lam)
        self.options = {"lam": self.lam}

    def score_episodes(self, support: dict, query: dict, way: int, shot: int) -> torch.Tensor:
        per_video = otam_distance(query["mean"], support["mean"], self.lam)  # (E, M, way*shot)
        return -per_video.unflatten(-1, (way, shot)).mean(-1)  # (E, M, N)

    @torch.no_grad()
    def explain(self, support: torch.Tensor, query: torch.Tensor, way: int, shot: int) -> dict:
        """frame_distances (M, way*shot, T_query, T_support), distances (N, M), logits (M, N)."""
        record: dict = {}
        self._run(support, query, way, shot, record)
        return record

    def _run(self, support, query, way, shot, record):
        self.check_episode(support, query, way, shot)
        s = at_least_fp32(support).mean((-2, -1))  # (way*shot, C, T)
        q = at_least_fp32(query).mean((-2, -1))  # (M, C, T)
        per_video = otam_distance(q, s, self.lam)  # (M, way*shot)
        distances = per_video.reshape(-1, way, shot).mean(-1).t()  # (N, M)
        logits = -distances.t()  # (M, N)
        if record is not None:
            record.update(frame_distances=frame_distances(q, s), distances=distances,
                          logits=logits)
        return logits
