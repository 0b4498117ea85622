"""TARN (Bishay, Zoumpourlis and Patras, BMVC 2019): temporal attentive relation network. A
bidirectional GRU embeds each video's segments; every query segment attends over the support
video's segments (segment-level alignment), is compared with its aligned support feature by an
element-wise product, and a second GRU over the comparisons with a linear read-out gives the
relation score of the (query, support video) pair.

The authors released no code. The computation follows the paper and the unofficial PyTorch
implementation by H. Coskun (github.com/Seleucia/TARN, tarn.py), whose sizes it takes: embedding
Bi-GRU(C -> 256 per direction); alignment scores (W s_i) . q_j with W (512 x 512); aligned
h_j = sum_i a_ij s_i; comparison q_j * h_j (their 'Mult'); relation GRU(512 -> 256) over the
query's segments, its last hidden state -> Linear(256 -> 1).

Choices written down: the attention is a softmax over the support segments i for each query
segment j - the paper's alignment as we read it (and that of the compare-aggregate model it
builds on); the unofficial code takes the softmax over the query axis instead, which does not
make a_.j a distribution over support segments. Their scores also add a bias vector b: b . q_j
is the same for every support segment i, so under the softmax over i it cancels (its gradient
is zero) and is left out. Segments are the cache's T frames (TARN used C3D features of
segments). TARN trains with a sigmoid on the score and a mean-squared error; the training loop
here uses cross-entropy on logits, so the pre-sigmoid relation score is the logit (the sigmoid
is monotone: 1-shot predictions rank the same). With K shots a class's logit is the mean of its
shots' scores. The GRUs run in float32 outside autocast (bf16 recurrent kernels are not
universal).
"""

from __future__ import annotations

import torch
from torch import nn

from align.models.learned import LearnedHead, frame_features, positive_int


class TARNHead(LearnedHead):
    """TARN on pooled frame features: Bi-GRU embedding, attention alignment, GRU relation.

    Args:
        channels: C of the maps.
        frames: T the head is built for (recorded; it runs on any T).
        height: H (recorded).
        width: W (recorded).
        shot: K (recorded; any K works).
        hidden: GRU width (per direction for the embedding): 256 in the unofficial code.
    """

    kind = "tarn"

    def __init__(self, channels: int = 2048, frames: int = 8, height: int = 7, width: int = 7,
                 shot: int = 1, hidden: int = 256):
        super().__init__(channels, frames, height, width, shot)
        hidden = positive_int(hidden, "hidden", self.kind)
        self.options = {"hidden": hidden}
        self.encoder = nn.GRU(channels, hidden, batch_first=True, bidirectional=True)
        self.align = nn.Linear(2 * hidden, 2 * hidden, bias=False)
        self.measure = nn.GRU(2 * hidden, hidden, batch_first=True)
        self.score = nn.Linear(hidden, 1)

    def embed(self, maps: torch.Tensor) -> torch.Tensor:
        """Segment embeddings (n, T, 2 * hidden) of maps (n, C, T, H, W)."""
        return self.encoder(frame_features(maps))[0]  # (n, T, 2h)

    def relations(self, s: torch.Tensor, q: torch.Tensor):
        """Relation logits (M, S) of embedded queries q (M, T, 2h) with embedded support videos
        s (S, T, 2h), and the alignment attention (M, S, T_support, T_query)."""
        keys = self.align(s)  # (S, T, 2h)
        scores = torch.einsum("sid,mjd->msij", keys, q)  # (M, S, Ts, Tq)
        attn = scores.softmax(-2)  # (M, S, Ts, Tq): over support segments i
        aligned = torch.einsum("msij,sid->msjd", attn, s)  # (M, S, Tq, 2h)
        compared = q[:, None] * aligned  # (M, S, Tq, 2h)
        m, n_support = compared.shape[:2]
        _, last = self.measure(compared.flatten(0, 1))  # last (1, M*S, h)
        return self.score(last[0]).view(m, n_support), attn  # (M, S), (M, S, Ts, Tq)

    def _run(self, support, query, way, shot, record):
        """explain keys: ``attention`` (M, way*shot, T_support, T_query): a_ij per pair;
        ``relations`` (M, way*shot): the relation logit of each query with each support video."""
        with torch.autocast(support.device.type, enabled=False):
            s = self.embed(support)  # (way*shot, T, 2h)
            q = self.embed(query)  # (M, T, 2h)
            rel, attn = self.relations(s, q)  # (M, way*shot), (M, way*shot, T, T)
        if record is not None:
            record.update(attention=attn, relations=rel)
        return rel.view(-1, way, shot).mean(-1)  # (M, N)
