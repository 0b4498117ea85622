"""TRN++ (the baseline of the OTAM paper, Cao et al. 2020, as the TA2N paper's Table 2 lists it):
the multi-scale temporal relation network of TRN (Zhou et al., ECCV 2018) turns a video's frame
features into one embedding; a class prototype is the mean embedding of its shots and a query
is scored by minus its squared Euclidean distance to each prototype (ProtoNet on top).

The relation module equals ``RelationModuleMultiScale`` of the official TRN code
(github.com/zhoubolei/TRN-pytorch, TRNmodule.py at commit 5c5ecf8) fed with our tuples (float64
test, values and gradients, 1- and 5-shot: tests/align/test_official_heads.py): frames first
pass a per-frame
Linear(C -> 256) (TRN's ``new_fc``, img_feature_dim 256); for every scale d = T, T-1, ..., 2 an
MLP g_d = ReLU -> Linear(d * 256 -> 256) -> ReLU -> Linear(256 -> dim) reads ordered d-tuples of
frames (their features concatenated in time order); the embedding is the sum of g_d over the
chosen tuples of all scales. The classifier TRN puts in ``dim`` (number of classes) becomes the
embedding width here (256).

Choices written down: TRN draws 3 of the tuples of each scale at random in every forward pass
(the scale T has only one), also at test time, from NumPy's global RNG; here each scale uses a
fixed set of ``tuples`` (3) spread evenly over the scale's tuples in itertools.combinations
order, first and last included (``tuples=0``: every tuple), so the same video always gets the
same embedding. The OTAM paper describes TRN++ only in words, so the ProtoNet pairing (mean
prototype, squared Euclidean distance, Snell et al. 2017) is our reading of it. TRN's dropout
before ``new_fc`` is left out (the training loop's input dropout regularises every head).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from align.models.learned import LearnedHead, frame_features, positive_int
from cache import UserError
from cache.options import Range, named_option


def relation_tuples(frames: int, scale: int, count: int) -> list[tuple[int, ...]]:
    """The ``scale``-frame tuples one scale reads: all of them if ``count`` is 0 or at least
    their number, else ``count`` spread evenly over itertools.combinations order."""
    combos = list(itertools.combinations(range(frames), scale))
    if count == 0 or count >= len(combos):
        return combos
    picks = np.round(np.linspace(0, len(combos) - 1, count)).astype(int)
    return [combos[i] for i in picks]


class TRNHead(LearnedHead):
    """TRN++: multi-scale temporal relation embedding + ProtoNet.

    Args:
        channels: C of the maps.
        frames: T; the head holds one relation MLP per scale 2..T, so it runs on T frames only.
        height: H (recorded).
        width: W (recorded).
        shot: K (recorded; any K works).
        dim: embedding width (TRN's class count).
        bottleneck: hidden width of each scale's MLP (TRN: 256).
        frame_dim: width of the per-frame projection (TRN's img_feature_dim: 256).
        tuples: tuples per scale (TRN: 3; 0 = all).
    """

    kind = "trn"
    OPTIONS = (
        named_option("dim", 256, help="embedding width", range=Range(1)),
        named_option("bottleneck", 256, help="hidden width of each scale's MLP",
                     range=Range(1)),
        named_option("frame_dim", 256, help="width of the per-frame projection",
                     range=Range(1)),
        named_option("tuples", 3, help="tuples per scale (0: all)", range=Range(0)),
    )

    def __init__(self, channels: int = 2048, frames: int = 8, height: int = 7, width: int = 7,
                 shot: int = 1, dim: int = 256, bottleneck: int = 256, frame_dim: int = 256,
                 tuples: int = 3):
        super().__init__(channels, frames, height, width, shot)
        if frames < 2:
            raise UserError(f"trn relates frames at scales 2..T and needs T >= 2, not T={frames}")
        self.options = {"dim": positive_int(dim, "dim", self.kind),
                        "bottleneck": positive_int(bottleneck, "bottleneck", self.kind),
                        "frame_dim": positive_int(frame_dim, "frame_dim", self.kind),
                        "tuples": positive_int(tuples, "tuples", self.kind, least=0)}
        self.min_frames = frames
        self.scales = list(range(frames, 1, -1))  # T, T-1, ..., 2 as in TRN
        for scale in self.scales:
            idx = torch.tensor(relation_tuples(frames, scale, self.options["tuples"]))
            self.register_buffer(f"tuples_{scale}", idx, persistent=False)  # (n_tuples, scale)
        self.frame_fc = nn.Linear(channels, frame_dim)
        self.fusion = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Linear(scale * frame_dim, bottleneck), nn.ReLU(),
                          nn.Linear(bottleneck, dim))
            for scale in self.scales)

    def embed(self, maps: torch.Tensor) -> torch.Tensor:
        """The relation embedding (n, dim) of maps (n, C, T, H, W)."""
        frames = self.frame_fc(frame_features(maps))  # (n, T, F)
        n = frames.shape[0]
        total = 0
        for scale, mlp in zip(self.scales, self.fusion):
            idx = getattr(self, f"tuples_{scale}")  # (P, d)
            tuples = frames[:, idx].reshape(n, idx.shape[0], -1)  # (n, P, d*F)
            total = total + mlp(tuples).sum(1)  # (n, dim)
        return total  # (n, dim)

    def _run(self, support, query, way, shot, record):
        """explain keys: ``support_embeddings`` (way*shot, dim), ``prototypes`` (N, dim),
        ``query_embeddings`` (M, dim)."""
        if support.shape[2] != self.frames:
            raise UserError(f"this trn head holds relation MLPs for T={self.frames} frames; "
                            f"the maps have T={support.shape[2]}")
        s = self.embed(support)  # (way*shot, dim)
        q = self.embed(query)  # (M, dim)
        protos = s.view(way, shot, -1).mean(1)  # (N, dim)
        sq_dist = (q[:, None] - protos[None]).pow(2).sum(-1)  # (M, N)
        if record is not None:
            record.update(support_embeddings=s, prototypes=protos, query_embeddings=q)
        return -sq_dist  # (M, N)
