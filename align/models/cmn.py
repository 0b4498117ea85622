"""CMN (Zhu and Yang, ECCV 2018; the journal version, Zhu and Yang 2020, is the TA2N paper's
CMN-J row): the compound memory network in its few-shot form. A multi-saliency embedding turns
a video's frames into m saliency descriptors; the memory stores, per slot, the m normalised
descriptors (constituent keys) and their normalised concatenation (the abstract key) with a
label; a query reads the memory by cosine similarity of abstract keys.

No code of the authors is public; this follows the paper. Multi-saliency embedding: frames are
projected, e_t = W x_t + b (Linear(C -> dim)); m learned hidden vectors h_i attend over time,
a_it = softmax_t(h_i . e_t); descriptor q_i = sum_t a_it e_t. Keys: constituents q_i / |q_i|,
abstract key = their concatenation / sqrt(m), a unit vector, so <abstract, abstract'> is the
mean over i of cos(q_i, q'_i).

The few-shot form, written down: an episode starts with an empty memory; the support videos are
written class by class in episode order with CMN's (and Kaiser et al. 2017's) update - a video
whose class is already stored updates that slot, k <- normalise(k + key), otherwise it takes a
new slot - so each class ends with one slot; a query's logits are ``scale`` x the cosine
similarity of its abstract key with each class's slot. CMN trains the memory with a margin
ranking loss on these similarities; the training loop here uses cross-entropy, for which the
similarities are sharpened by ``scale`` (10, our choice, as are dim = 512 and m = 8). The
spatial mean of the cached maps stands in for the frame features CMN read from its CNN.

What CMN cannot see, by design: the multi-saliency embedding is a set of attention-weighted
sums over frames, so a video's keys - and its logits - do not change when its frames are
reordered (tests/align/test_table2_heads.py). Classes that differ only in the order of what
they show are therefore beyond CMN-J: on a synthetic cache whose classes are orders of the same
5 patterns (``cli.py synth --channels 32 --length 0 --patterns 5``) its validation accuracy
stayed at chance (18.8 / 18.9 / 18.8 after 100 / 200 / 300 episodes of 5-way 1-shot, Adam 1e-3,
one seed), for scale 10 and 40 alike, where TARN reached 56 and TRX 68. This is CMN's slow
learning on order-defined data, not a choice of ours: on a cache whose classes also differ in
which patterns they show (``--length 4``, the default) it learns fast (71.7 after 300 episodes;
scale 5: 71.7, 20: 64.4, 40: 56.6 - the default 10 is kept). The memory's normalisation is not a
factor at K = 1 (a class's slot is its one key, already unit length).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from align.models.learned import LearnedHead, frame_features, positive_int
from cache import UserError
from cache.options import Range, named_option


def write_memory(keys: torch.Tensor) -> torch.Tensor:
    """One slot per class from the abstract keys of its shots, (N, K, D) -> (N, D): the first
    shot opens the slot, every further shot updates it, k <- normalise(k + key)."""
    slot = keys[:, 0]  # (N, D)
    for k in range(1, keys.shape[1]):
        slot = F.normalize(slot + keys[:, k], dim=-1)  # (N, D)
    return slot  # (N, D)


class CMNHead(LearnedHead):
    """CMN's multi-saliency embedding and compound-memory read, per episode.

    Args:
        channels: C of the maps.
        frames: T the head is built for (recorded; it runs on any T).
        height: H (recorded).
        width: W (recorded).
        shot: K (recorded; any K works).
        dim: width of the projected frame features.
        saliency: m, the number of saliency descriptors (hidden vectors).
        scale: inverse temperature of the cosine similarities used as logits.
    """

    kind = "cmn"
    OPTIONS = (
        named_option("dim", 512, help="width of the projected frame features", range=Range(1)),
        named_option("saliency", 8, help="m, the number of saliency descriptors",
                     range=Range(1)),
        named_option("scale", 10.0, help="inverse temperature of the cosine logits"),
    )

    def __init__(self, channels: int = 2048, frames: int = 8, height: int = 7, width: int = 7,
                 shot: int = 1, dim: int = 512, saliency: int = 8, scale: float = 10.0):
        super().__init__(channels, frames, height, width, shot)
        dim = positive_int(dim, "dim", self.kind)
        saliency = positive_int(saliency, "saliency", self.kind)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
            raise UserError(f"cmn option scale must be a positive number, not {scale!r}")
        self.options = {"dim": dim, "saliency": saliency, "scale": float(scale)}
        self.project = nn.Linear(channels, dim)
        self.hidden = nn.Parameter(torch.empty(saliency, dim))
        self._reset_own(None)  # the registry re-draws everything from the seed

    def _reset_own(self, generator):
        bound = 1 / math.sqrt(self.hidden.shape[1])  # as a Linear(dim -> m) would be
        with torch.no_grad():
            self.hidden.uniform_(-bound, bound, generator=generator)

    def keys(self, maps: torch.Tensor):
        """Abstract keys (n, m * dim), unit length, and the saliency attention (n, m, T)."""
        e = self.project(frame_features(maps))  # (n, T, dim)
        attn = torch.einsum("id,ntd->nit", self.hidden, e).softmax(-1)  # (n, m, T)
        descriptors = torch.einsum("nit,ntd->nid", attn, e)  # (n, m, dim)
        constituents = F.normalize(descriptors, dim=-1)  # (n, m, dim)
        m = constituents.shape[1]
        return constituents.flatten(1) / math.sqrt(m), attn  # (n, m*dim), (n, m, T)

    def _run(self, support, query, way, shot, record):
        """explain keys: ``saliency_support`` (way*shot, m, T) and ``saliency_query`` (M, m, T):
        each descriptor's attention over frames; ``slots`` (N, m*dim): the class slots;
        ``similarity`` (M, N): cosine of each query's key with each slot."""
        s_keys, s_attn = self.keys(support)  # (way*shot, D), (way*shot, m, T)
        q_keys, q_attn = self.keys(query)  # (M, D), (M, m, T)
        slots = write_memory(s_keys.view(way, shot, -1))  # (N, D)
        similarity = q_keys @ slots.t()  # (M, N)
        if record is not None:
            record.update(saliency_support=s_attn, saliency_query=q_attn, slots=slots,
                          similarity=similarity)
        return self.options["scale"] * similarity  # (M, N)
