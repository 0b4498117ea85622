"""TARN (Bishay, Zoumpourlis and Patras, BMVC 2019): temporal attentive relation network. A
bidirectional GRU embeds each video's segments; every query segment attends over the support
video's segments (segment-level alignment), is compared with its aligned support feature, and
a second GRU over the comparisons with a linear read-out gives the relation score of the
(query, support video) pair.

The authors released no code. The computation follows the paper and the unofficial PyTorch
implementation by H. Coskun (github.com/Seleucia/TARN, tarn.py at commit 33e46c2), whose sizes
it takes: embedding Bi-GRU(C -> 256 per direction); alignment scores (W s_i) . q_j with W
(512 x 512); aligned h_j = sum_i a_ij s_i; comparison of q_j with h_j by their default
``sim_type`` 'EucCos' (``compare="euccos"``: cos(q_j, h_j) with eps 1e-6 and |q_j - h_j|, two
numbers per segment), or by their 'Mult' (q_j * h_j) or 'Subt' (q_j - h_j); relation GRU over the
query's segments (input 2, or 512), its last hidden state -> Linear(256 -> 1). Equal to their
code with the softmax axis below (float64 test, values and gradients, 1- and 5-shot:
tests/align/test_official_heads.py).

Why "euccos" is the default (the product was, in checkpoints of version 1, which load with it):
the product of two GRU states is tiny at initialisation - GRU states of small inputs are small,
and their product is smaller still - so the relation scores of all classes start almost equal
and their gradients almost vanish: on a C = 32 synthetic cache (``cli.py synth --channels 32
--seed 1``) the logits' spread over the 5 classes at initialisation is 1.7e-4 with the product
and 1.2e-3 with 'EucCos', the loss gradient's norm 0.0012 against 0.020. Trained the same way
(Adam 1e-3, cosine over 300 episodes of 5-way 1-shot, 3 queries per class), validation accuracy
after 100 / 200 / 300 episodes, mean over seeds 0, 1, 2, was 40.2 / 50.8 / 51.5 with the
product (std 15.4 / 4.7 / 3.8) and 57.9 / 63.2 / 63.9 with 'EucCos' (std 2.6 / 2.2 / 0.3); on a
cache whose classes differ only in the order of their patterns (``--length 0 --patterns 5``, one
seed) 32.2 / 33.7 / 34.0 against 44.0 / 52.5 / 56.1 (docs/table2.md). The learning rate is not
the cause: the unofficial code trains with Adam at 1e-4 (weight decay 5e-4, binary
cross-entropy on the sigmoid, millions of updates), ten times below the fast recipe's 1e-3.

Choices written down: the attention is a softmax over the support segments i for each query
segment j - the paper's alignment as we read it (and that of the compare-aggregate model it
builds on); the unofficial code takes the softmax over the query axis instead, which does not
make a_.j a distribution over support segments. Their scores also add a bias vector b: b . q_j
is the same for every support segment i, so under the softmax over i it cancels (its gradient
is zero) and is left out. Segments are the cache's T frames (TARN used C3D features of
segments). TARN trains with a sigmoid on the score and a squared error (the unofficial code: a
binary cross-entropy); the training loop here uses cross-entropy on logits, so the pre-sigmoid
relation score is the logit (the sigmoid is monotone: 1-shot predictions rank the same). With K
shots a class's logit is the mean of its shots' scores. The GRUs run in float32 outside autocast
(bf16 recurrent kernels are not universal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from align.models.learned import LearnedHead, frame_features, positive_int
from cache import UserError
from cache.options import Range, named_option

# how a query segment q_j is compared with its aligned support feature h_j (their sim_type)
COMPARE = ("euccos", "mult", "subt")
COS_EPS = 1e-6  # their nn.CosineSimilarity(dim=-1, eps=1e-6)


class TARNHead(LearnedHead):
    """TARN on pooled frame features: Bi-GRU embedding, attention alignment, GRU relation.

    Args:
        channels: C of the maps.
        frames: T the head is built for (recorded; it runs on any T).
        height: H (recorded).
        width: W (recorded).
        shot: K (recorded; any K works).
        hidden: GRU width (per direction for the embedding): 256 in the unofficial code.
        compare: "euccos" (their default: cos(q_j, h_j) and |q_j - h_j|, 2 numbers per
            segment), "mult" (q_j * h_j) or "subt" (q_j - h_j); see the module docstring.
    """

    kind = "tarn"
    OPTIONS = (
        named_option("hidden", 256, help="GRU width (per direction for the embedding)",
                     range=Range(1)),
        named_option("compare", "euccos", help="how a query segment meets its aligned support "
                     "segment", choices=COMPARE),
    )

    def __init__(self, channels: int = 2048, frames: int = 8, height: int = 7, width: int = 7,
                 shot: int = 1, hidden: int = 256, compare: str = "euccos"):
        super().__init__(channels, frames, height, width, shot)
        hidden = positive_int(hidden, "hidden", self.kind)
        if compare not in COMPARE:
            raise UserError(f"tarn option compare must be one of {list(COMPARE)}, not "
                            f"{compare!r}")
        self.options = {"hidden": hidden, "compare": compare}
        self.encoder = nn.GRU(channels, hidden, batch_first=True, bidirectional=True)
        self.align = nn.Linear(2 * hidden, 2 * hidden, bias=False)
        self.measure = nn.GRU(2 if compare == "euccos" else 2 * hidden, hidden, batch_first=True)
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
        compared = self.compare(q[:, None].expand_as(aligned), aligned)  # (M, S, Tq, 2 | 2h)
        m, n_support = compared.shape[:2]
        _, last = self.measure(compared.flatten(0, 1))  # last (1, M*S, h)
        return self.score(last[0]).view(m, n_support), attn  # (M, S), (M, S, Ts, Tq)

    def compare(self, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Per segment comparison of queries q and aligned support features h (..., Tq, 2h):
        (..., Tq, 2) for euccos, (..., Tq, 2h) for mult and subt."""
        how = self.options["compare"]
        if how == "mult":
            return q * h
        if how == "subt":
            return q - h
        cos = F.cosine_similarity(q, h, dim=-1, eps=COS_EPS)  # (..., Tq)
        return torch.stack([cos, (q - h).norm(dim=-1)], -1)  # (..., Tq, 2)

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
