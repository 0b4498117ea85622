"""ProtoNet on frames (Snell et al. 2017, as the TA2N paper's baseline): no alignment, no
parameters - the reference every alignment module is measured against.
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

    def forward(self, support: torch.Tensor, query: torch.Tensor, way: int,
                shot: int) -> torch.Tensor:
        return self._run(support, query, way, shot, None)

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
