"""TRX (Perrett et al., CVPR 2021): temporal-relational cross-transformers. Every ordered tuple
of omega frames of a video (pairs and triples by default) is one token; for each query tuple,
attention over all tuples of all shots of a class builds a query-specific class prototype, and
the distance is the mean squared difference of the query's tuple values to it.

Equal (float64 test, values and gradients, 1- and 5-shot: tests/align/test_official_heads.py)
to ``TemporalCrossTransformer`` and ``CNN_TRX`` of the official code on the backbone's pooled
frame features - tobyperrett/few-shot-action-recognition, model.py at commit 3687f3a (lines
102-194 and 197-219), the same arithmetic as tobyperrett/trx, model.py since commit ef0d9b0:

- a fixed sinusoidal positional encoding scaled by 0.1 is added to each frame (d_model = C);
- a tuple is its frames' features concatenated in time order, (omega * C); keys and values are
  Linear(omega * C -> dim) shared by support and query, keys pass through one LayerNorm, values
  do not; dim = 1152 as in their code (for every backbone);
- scores = <query key, support key> / sqrt(dim), softmax over all tuples of all the class's shots
  at once (per query tuple); prototype = the attention-weighted support values;
- distance_omega = ||query values - prototype||^2 summed over tuples and dim, / number of
  tuples; the logits are minus the **mean** over the cardinalities of these distances
  (``combine="mean"``, their ``torch.mean(sample_logits, dim=[-1])``, model.py line 216).

``combine="norm"`` is the rule of the first release of tobyperrett/trx (model.py before commit
ef0d9b0, "changed norm to mean when combining trxs in model"): logits = minus the L2 norm of
the per-cardinality distances - about sqrt(#cardinalities) times the mean when they agree, a
sharper softmax in training. It is kept because this project's checkpoints written before
the mean became the default (``align/checkpoints.py``, version 1) were trained with it and load
with it; new heads use the mean.

Choices where the official code does not carry over: its positional encoding's dropout (0.1) is
left out - the training loop's dropout on the input maps is every head's regulariser here, and
a head-internal dropout would draw from the global RNG; for odd C the cosine half of the
encoding takes floor(C / 2) frequencies (their code needs an even C). The spatial mean of the
cached maps stands in for the ResNet's average pool, as for every pooled head here.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from align.models.learned import LearnedHead, frame_features, positive_int
from cache import UserError
from cache.options import Range, named_option

PE_SCALE = 0.1  # their PositionalEncoding's pe_scale_factor
COMBINE = ("mean", "norm")  # how the cardinalities' distances make one logit (module docstring)


def positional_encoding(frames: int, channels: int, dtype=torch.float32,
                        device=None) -> torch.Tensor:
    """(T, C) sinusoids: sin on even channels, cos on odd ones, scaled by 0.1 (TRX's)."""
    position = torch.arange(frames, dtype=dtype, device=device)[:, None]  # (T, 1)
    div = torch.exp(torch.arange(0, channels, 2, dtype=dtype, device=device)
                    * -(math.log(10000.0) / channels))  # (ceil(C/2),)
    pe = torch.zeros(frames, channels, dtype=dtype, device=device)  # (T, C)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div[: channels // 2])
    return pe * PE_SCALE


def frame_tuples(frames: int, size: int, device=None) -> torch.Tensor:
    """(n_tuples, size) indices of every ordered ``size``-subset of range(frames), in
    itertools.combinations order (TRX's ``self.tuples``)."""
    combos = list(itertools.combinations(range(frames), size))
    return torch.tensor(combos, dtype=torch.long, device=device).view(len(combos), size)


class TemporalCrossTransformer(nn.Module):
    """One cardinality omega of TRX.

    Args:
        channels: C of the frame features.
        dim: width of keys and values.
        size: omega, frames per tuple.
    """

    def __init__(self, channels: int = 2048, dim: int = 1152, size: int = 2):
        super().__init__()
        self.size, self.dim = size, dim
        self.k_linear = nn.Linear(size * channels, dim)
        self.v_linear = nn.Linear(size * channels, dim)
        self.norm_k = nn.LayerNorm(dim)

    def tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """Tuples of frames (n, T, C) with their positional encoding -> (n, tuples, omega*C)."""
        n, t, c = frames.shape
        idx = frame_tuples(t, self.size, frames.device)  # (P, omega)
        return frames[:, idx].reshape(n, idx.shape[0], self.size * c)  # (n, P, omega*C)

    def forward(self, support: torch.Tensor, query: torch.Tensor, way: int, shot: int):
        """Distances (M, way) and attention (M, way, P, shot, P) for support frames
        (way*shot, T, C) and query frames (M, T, C), positional encoding already added."""
        s_tok, q_tok = self.tokens(support), self.tokens(query)  # (S, P, wC), (M, P, wC)
        tuples = s_tok.shape[1]
        s_k = self.norm_k(self.k_linear(s_tok)).view(way, shot, tuples, -1)  # (N, K, P, D)
        q_k = self.norm_k(self.k_linear(q_tok))  # (M, P, D)
        s_v = self.v_linear(s_tok).view(way, shot, tuples, -1)  # (N, K, P, D)
        q_v = self.v_linear(q_tok)  # (M, P, D)
        scores = torch.einsum("mpd,nksd->mnpks", q_k, s_k) / math.sqrt(self.dim)  # (M,N,P,K,P)
        m = q_k.shape[0]
        attn = scores.reshape(m, way, tuples, shot * tuples).softmax(-1)  # (M, N, P, K*P)
        attn = attn.view(m, way, tuples, shot, tuples)  # (M, N, P, K, P)
        protos = torch.einsum("mnpks,nksd->mnpd", attn, s_v)  # (M, N, P, D)
        diff = q_v[:, None] - protos  # (M, N, P, D)
        return diff.pow(2).sum((-2, -1)) / tuples, attn  # (M, N), (M, N, P, K, P)


class TRXHead(LearnedHead):
    """TRX on pooled frame features: one cross-transformer per tuple cardinality.

    Args:
        channels: C of the maps.
        frames: T the head is built for (recorded; it runs on any T >= max(sets)).
        height: H (recorded).
        width: W (recorded).
        shot: K (recorded; any K works).
        dim: width of keys and values (1152 in the official code).
        sets: the tuple cardinalities omega (official default: pairs and triples).
        combine: "mean" (the official code's) or "norm" (its first release; this project's
            checkpoints before version 2) of the cardinalities' distances.
    """

    kind = "trx"
    OPTIONS = (
        named_option("dim", 1152, help="width of keys and values", range=Range(1)),
        named_option("sets", [2, 3], help="the tuple cardinalities", range=Range(1)),
        named_option("combine", "mean", help="how the cardinalities' distances make one logit",
                     choices=COMBINE),
    )

    def __init__(self, channels: int = 2048, frames: int = 8, height: int = 7, width: int = 7,
                 shot: int = 1, dim: int = 1152, sets: list[int] | tuple[int, ...] = (2, 3),
                 combine: str = "mean"):
        super().__init__(channels, frames, height, width, shot)
        dim = positive_int(dim, "dim", self.kind)
        if isinstance(sets, int | str) or not sets:
            raise UserError(f"trx option sets must be a non-empty list of tuple sizes, "
                            f"not {sets!r}")
        sets = sorted({positive_int(s, "sets", self.kind) for s in sets})
        if combine not in COMBINE:
            raise UserError(f"trx option combine must be one of {list(COMBINE)}, not {combine!r}")
        self.options = {"dim": dim, "sets": sets, "combine": combine}
        self.min_frames = max(sets)
        self.cross = nn.ModuleList(TemporalCrossTransformer(channels, dim, s) for s in sets)

    def _run(self, support, query, way, shot, record):
        """explain keys: ``attention_<omega>`` (M, N, P, K, P) per cardinality (query tuple,
        then the class's shots and their tuples), ``distance_<omega>`` (M, N)."""
        frames = support.shape[2]
        pe = positional_encoding(frames, self.channels, support.dtype, support.device)  # (T, C)
        s = frame_features(support) + pe  # (way*shot, T, C)
        q = frame_features(query) + pe  # (M, T, C)
        distances = []
        for cross in self.cross:
            dist, attn = cross(s, q, way, shot)  # (M, N), (M, N, P, K, P)
            distances.append(dist)
            if record is not None:
                record[f"attention_{cross.size}"] = attn
                record[f"distance_{cross.size}"] = dist
        stacked = torch.stack(distances, -1)  # (M, N, #sets)
        if self.options["combine"] == "norm":  # the first release: -|| (d_2, d_3, ...) ||_2
            return -stacked.norm(dim=-1)  # (M, N)
        return -stacked.mean(-1)  # (M, N): their CNN_TRX, torch.mean over the cardinalities
