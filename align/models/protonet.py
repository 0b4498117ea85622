"""ProtoNet on frames (Snell et al. 2017, as the TA2N paper's baseline): no alignment, no
parameters - the reference every alignment module is measured against.

This is TA2N's frame-wise baseline (its Table 3's "no module" row: the prototype is the mean of
the shots frame by frame, the distance the sum over frames of 1 - cos), not the ``CNN_TSN`` of
tobyperrett/few-shot-action-recognition (model.py at 3687f3a, class CNN_TSN from line 303),
which averages the frames first and scores the cosine of the two video means (or minus their
squared distance).
"""

from __future__ import annotations

import torch

from align.models.base import Head
from align.models.layers import at_least_fp32, frame_cosine_distance


class ProtoNetHead(Head):
    """ProtoNet on frames: spatial mean per frame, prototype = mean over shots, distance =
    sum over frames of 1 - cos. No parameters: it evaluates without training.

    Args:
        channels: C of the maps (recorded).
        frames: T (recorded).
        height: H (recorded).
        width: W (recorded).
        shot: K (recorded).
    """

    kind = "protonet"
    training_free = True
    precomputes = True  # the state of a video is its per-frame spatial mean

    def forward(self, support: torch.Tensor, query: torch.Tensor, way: int,
                shot: int) -> torch.Tensor:
        return self._run(support, query, way, shot, None)

    def forward_episodes(self, support: torch.Tensor, query: torch.Tensor, way: int,
                         shot: int) -> torch.Tensor:
        """Logits (E, M, way) of E stacked episodes in one pass (no parameters: the states
        are computed on the fly)."""
        self.check_episodes(support, query, way, shot)
        return self.score_episodes(self.precompute(support, shot), self.precompute(query, shot),
                                   way, shot)

    def precompute(self, maps: torch.Tensor, shot: int) -> dict[str, torch.Tensor]:
        """{"mean": (..., C, T)}: the per-frame spatial means of maps (..., C, T, H, W)."""
        return {"mean": at_least_fp32(maps).mean((-2, -1))}

    def score_episodes(self, support: dict, query: dict, way: int, shot: int) -> torch.Tensor:
        s = support["mean"]  # (E, way*shot, C, T)
        q = query["mean"]  # (E, M, C, T)
        protos = s.unflatten(1, (way, shot)).mean(2)  # (E, N, C, T)
        f_s = protos[:, :, None].expand(-1, -1, q.shape[1], -1, -1)  # (E, N, M, C, T)
        f_q = q[:, None].expand(-1, way, -1, -1, -1)  # (E, N, M, C, T)
        return -frame_cosine_distance(f_s, f_q).transpose(1, 2)  # (E, M, N)

    @torch.no_grad()
    def explain(self, support: torch.Tensor, query: torch.Tensor, way: int, shot: int) -> dict:
        """prototypes (N, T, C), queries (M, T, C), f_s / f_q (N, M, T, C), distances (N, M),
        logits (M, N)."""
        record: dict = {}
        self._run(support, query, way, shot, record)
        return record

    def _run(self, support, query, way, shot, record):
        self.check_episode(support, query, way, shot)
        pooled = at_least_fp32(support).mean((-2, -1))  # (way*shot, C, T)
        protos = pooled.reshape(way, shot, *pooled.shape[1:]).mean(1)  # (N, C, T)
        queries = at_least_fp32(query).mean((-2, -1))  # (M, C, T)
        f_s = protos[:, None].expand(-1, queries.shape[0], -1, -1)  # (N, M, C, T)
        f_q = queries[None].expand(way, -1, -1, -1)  # (N, M, C, T)
        distances = frame_cosine_distance(f_s, f_q)  # (N, M)
        logits = -distances.t()  # (M, N)
        if record is not None:
            record.update(prototypes=protos.transpose(1, 2), queries=queries.transpose(1, 2),
                          f_s=f_s.transpose(2, 3), f_q=f_q.transpose(2, 3),
                          distances=distances, logits=logits)
        return logits
