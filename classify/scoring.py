"""Phase two for classify: logits of query clips against classes holding any number of support
clips each, through evaluate's per-video precompute and scoring (``compute_states``,
``score_episodes``): every clip's state is computed once, then only (class, query) pairs are paid.

The K rule. A class's clip count K_c may differ from the checkpoint's K and between classes. The
head's ``shot_rule`` says how it builds a class from K videos:

- ``"any"`` (ProtoNet, OTAM, TRN++, TARN, CMN, ARN, TRX: their prototypes take any K): a class is
  built from all its K_c clips;
- ``"many"`` (TA2N trained with K > 1: its multi-shot weights Wk', Wq', Wv' are C x C, so they
  take any K >= 2): the same, and a class with one clip gets that clip twice - the multi-shot path
  of one clip (aligned to itself, projected by Wv'), so that every prototype and every query is
  in the Wv' space the head was trained in (its 1-shot path skips Wv');
- ``"one"`` (TA2N trained 1-shot: no multi-shot weights): every clip is a 1-shot prototype of its
  own, and a class's logit is the mean of its clips' logits (TARN's K-shot rule), so nothing
  untrained enters.

Classes with the same shot count form one episode (way = their number, shot = K) scored against
every query; a class's logit therefore depends only on its own clips and the query (every
registered head scores a pair from that class's support and that query alone: tested). With
every class at the checkpoint's K, all three rules are exactly one ``evaluate`` episode.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from align.evaluate import autocast, compute_states
from align.models import Head

QUERY_BLOCK = 256  # queries whose states are held at once: bounds memory for any number
PAIRS_PER_CALL = 512  # (prototype, query) pairs per scoring call: bounds the pair work's memory


class _Maps:
    """Maps held in memory, served as ``compute_states`` reads a ``Feeder``: (rows, views)
    requests -> (n, C, T, H, W) tensors on the device in the compute dtype."""

    def __init__(self, maps: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.maps, self.device, self.dtype = maps, device, dtype

    def load(self, rows) -> torch.Tensor:
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        return self.maps.index_select(0, index).to(self.device).to(self.dtype)

    def stream(self, requests):
        for rows, _ in requests:
            yield self.load(rows)


def prototype_units(rule: str, members: list[list[int]]) -> list[tuple[int, list[int]]]:
    """(class, its support clips as the head sees them) per prototype: see the module docstring.
    ``members[c]`` lists class c's clips (indices into the support maps)."""
    if rule == "one":
        return [(c, [i]) for c, clips in enumerate(members) for i in clips]
    if rule == "many":
        return [(c, clips if len(clips) > 1 else clips * 2) for c, clips in enumerate(members)]
    if rule == "any":
        return [(c, list(clips)) for c, clips in enumerate(members)]
    raise ValueError(f"unknown shot rule {rule!r}")


def episodes_of(units: list[tuple[int, list[int]]]) -> list[tuple[int, list[int]]]:
    """(shot, positions in ``units``) of the episodes: prototypes of equal shot count together."""
    by_shot: dict[int, list[int]] = defaultdict(list)
    for position, (_, clips) in enumerate(units):
        by_shot[len(clips)].append(position)
    return sorted(by_shot.items())


def class_logits(head: Head, support: torch.Tensor, members: list[list[int]],
                 query: torch.Tensor, *, device: torch.device, amp: bool = True,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, N) logits of ``query`` (M, C, T, H, W) against the N classes whose clips are
    ``members`` (indices into ``support`` (S, C, T, H, W)), by the head's K rule.

    Args:
        head: the head (put in eval mode for the call).
        device: where the head runs (``head`` must be there).
        amp: bfloat16 autocast on CUDA, as evaluate.
        dtype: the compute dtype the maps are converted to (float32; float64 in exactness
            tests, with a float64 head).
    """
    units = prototype_units(head.shot_rule, members)
    episodes = episodes_of(units)
    supports = _Maps(support, device, dtype)
    queries = _Maps(query, device, dtype)
    was_training = head.training
    head.eval()
    per_unit = torch.empty(len(query), len(units), dtype=dtype)  # (M, U)
    try:
        with torch.inference_mode():
            states = {}
            if head.precomputes:  # each support clip's state once per shot count
                rows = np.arange(len(support))
                states = {shot: compute_states(head, supports, rows, shot, device=device,
                                               amp=amp) for shot, _ in episodes}
            for start in range(0, len(query), QUERY_BLOCK):
                block = np.arange(start, min(start + QUERY_BLOCK, len(query)))
                for shot, positions in episodes:
                    rows = np.concatenate([units[p][1] for p in positions])  # class-major
                    logits = _score_block(head, supports, queries, states.get(shot), rows,
                                          block, len(positions), shot, device, amp)
                    per_unit[torch.as_tensor(block)[:, None], torch.as_tensor(positions)] = \
                        logits.to(dtype).cpu()
    finally:
        head.train(was_training)
    owner = torch.tensor([c for c, _ in units])  # (U,) the class of each prototype
    counts = torch.bincount(owner, minlength=len(members)).to(dtype)  # (N,)
    out = torch.zeros(len(query), len(members), dtype=dtype).index_add_(1, owner, per_unit)
    return out / counts  # (M, N): a class's mean over its prototypes (one, except rule "one")


def _score_block(head, supports: _Maps, queries: _Maps, support_states, rows, block, way, shot,
                 device, amp) -> torch.Tensor:
    """(len(block), way) logits of one episode's prototypes (support ``rows``, class-major)
    against the queries ``block``, PAIRS_PER_CALL pairs per call."""
    per_call = max(1, PAIRS_PER_CALL // way)
    index = torch.as_tensor(rows, device=device)
    if head.precomputes:
        support = {k: v.index_select(0, index)[None] for k, v in support_states.items()}
        query_states = compute_states(head, queries, block, shot, device=device, amp=amp)
    else:
        support = supports.load(rows)[None]  # (1, way*shot, C, T, H, W)
    out = []
    for i in range(0, len(block), per_call):
        with autocast(device, amp):
            if head.precomputes:
                chunk = {k: v[i:i + per_call][None] for k, v in query_states.items()}
                logits = head.score_episodes(support, chunk, way, shot)  # (1, m, way)
            else:
                chunk = queries.load(block[i:i + per_call])[None]  # (1, m, C, T, H, W)
                logits = head.forward_episodes(support, chunk, way, shot)  # (1, m, way)
        out.append(logits[0])
    return torch.cat(out)  # (len(block), way)


def explain_class(head: Head, support: torch.Tensor, clips: list[int], query: torch.Tensor,
                  *, device: torch.device, dtype: torch.dtype = torch.float32
                  ) -> tuple[dict, int]:
    """(the head's ``explain`` record of ``query`` (1, C, T, H, W) against one class, the
    support clip it shows): the class's prototype by the K rule; under rule "one" the clip whose
    1-shot logit is highest (the one that counts most in the class's mean)."""
    units = prototype_units(head.shot_rule, [clips])
    if len(units) > 1:  # rule "one": each clip alone
        logits = class_logits(head, support, [[i] for i in clips], query, device=device,
                              dtype=dtype)[0]  # (K,)
        units = [units[int(logits.argmax())]]
    rows = units[0][1]
    maps = support[torch.as_tensor(rows)].to(device, dtype)  # (shot, C, T, H, W)
    record = head.explain(maps, query.to(device, dtype), 1, len(rows))
    return {k: v.float().cpu().numpy() for k, v in record.items()}, rows[0]
