"""TA2N (Li et al., AAAI 2022): TTM warps each video in time, the multi-shot step builds class
prototypes, then ACM's temporal (TC) and spatial (SC) coordination align every (prototype, query)
pair before the frame cosine distance. The switches give Table 3's and Table 4's rows.

Three exact forms of the same function (``path``): "direct", the authors' form (cat, conv,
broadcast, sum); "maps", the form on whole maps with the first conv split by input and einsum
pooling (``_run``, also what ``explain`` records); "factored" (the default, ``fast=True``), the
per-video / per-pair factorisation of ``align.models.factored``: batched over episodes in
training, and in evaluation per-video states (``precompute``) scored per episode.
"""

from __future__ import annotations

import torch

from align.models import factored
from align.models.acm import SC_MODES, SpatialCoordination, TemporalCoordination
from align.models.base import Head, HeadConfig
from align.models.layers import frame_cosine_distance
from align.models.prototypes import ShotAlignment
from align.models.ttm import TemporalTransform
from cache import UserError
from cache.options import named_option


class TA2NHead(Head):
    """TA2N: TTM per video, multi-shot prototypes, then TC and SC per (prototype, query) pair.

    Switching a stage off removes its weights; without SC the per-frame features are the spatial
    means of the maps that reach that point (Table 3's rows: none, TTM, TTM+TC, all, TC, TC+SC).

    Args:
        channels: C of the maps.
        frames: T the head is built for (recorded; the head runs on any T >= 4).
        height: H the head is built for (recorded).
        width: W the head is built for (recorded).
        shot: K; with K > 1 the head holds the multi-shot prototype weights (Wk', Wq', Wv').
        ttm: use the temporal transform module.
        tc: use ACM's temporal coordination.
        sc: use ACM's spatial coordination.
        sc_mode: "mask", "grid" or "enumerate" (Table 4).
        fast: the exact fast forms (the "factored" path); False: the authors' direct form.
    """

    kind = "ta2n"
    OPTIONS = (
        named_option("ttm", True, help="the temporal transform module (Table 3)"),
        named_option("tc", True, help="ACM's temporal coordination (Table 3)"),
        named_option("sc", True, help="ACM's spatial coordination (Table 3)"),
        named_option("sc_mode", "mask", help="SC's design (Table 4)", choices=SC_MODES),
        named_option("fast", True, help="the exact fast forms; false: the authors' direct form"),
    )
    PATHS = ("direct", "maps", "factored")

    def __init__(self, channels: int = 2048, frames: int = 8, height: int = 7, width: int = 7,
                 shot: int = 1, ttm: bool = True, tc: bool = True, sc: bool = True,
                 sc_mode: str = "mask", fast: bool = True):
        super().__init__(channels, frames, height, width, shot)
        if sc_mode not in SC_MODES:
            raise UserError(f"unknown SC mode {sc_mode!r}; choose one of {list(SC_MODES)}")
        self.sc_mode, self.fast = sc_mode, fast
        self.ttm = TemporalTransform(channels) if ttm else None
        self.shots = ShotAlignment(channels, fast) if shot > 1 else None
        self.tc = TemporalCoordination(channels) if tc else None
        self.sc = SpatialCoordination(channels, sc_mode, fast) if sc else None
        self.path = "factored" if fast else "direct"

    @property
    def config(self) -> HeadConfig:
        options = dict(ttm=self.ttm is not None, tc=self.tc is not None, sc=self.sc is not None,
                       sc_mode=self.sc_mode, fast=self.fast)  # fast follows set_path
        return HeadConfig(kind="ta2n", channels=self.channels, frames=self.frames,
                          height=self.height, width=self.width, shot=self.shot, options=options)

    def set_fast(self, fast: bool) -> TA2NHead:
        """Switch between the fast forms and the direct form (same weights, same results)."""
        return self.set_path("factored" if fast else "direct")

    def set_path(self, path: str) -> TA2NHead:
        """Use one of ``PATHS`` (same weights, same results; benchmarks compare them)."""
        if path not in self.PATHS:
            raise ValueError(f"unknown path {path!r}; choose one of {self.PATHS}")
        self.path, self.fast = path, path != "direct"
        for part in (self.shots, self.sc):
            if part is not None:
                part.fast = self.fast
        return self

    @property
    def shot_rule(self) -> str:
        """Built for K = 1 (no multi-shot weights): "one"; else "many": Wk', Wq', Wv' are C x C
        and take any K >= 2, while K = 1 skips them (the query is not projected by Wv')."""
        return "many" if self.shots is not None else "one"

    @property
    def precomputes(self) -> bool:
        return self.path == "factored"

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for part in (self.ttm, self.shots, self.tc, self.sc):
            if part is not None:
                part.reset_parameters(generator)

    def decay(self) -> None:
        if self.sc is not None:
            self.sc.decay()

    def forward(self, support: torch.Tensor, query: torch.Tensor, way: int,
                shot: int) -> torch.Tensor:
        """Logits (M, way) for support (way*shot, C, T, H, W) and query (M, C, T, H, W)."""
        if self.path == "factored":
            return self.forward_episodes(support[None], query[None], way, shot)[0]
        return self._run(support, query, way, shot, None)

    def forward_episodes(self, support: torch.Tensor, query: torch.Tensor, way: int,
                         shot: int) -> torch.Tensor:
        """Logits (E, M, way) of E episodes in one batched pass (factored path; BatchNorm
        statistics per episode in training, as E separate calls); a loop on the others."""
        if self.path != "factored":
            return super().forward_episodes(support, query, way, shot)
        self.check_episodes(support, query, way, shot)
        episodes = support.shape[0]
        support, query = self._prepare(support.flatten(0, 1), query.flatten(0, 1), shot)
        classes, queries = factored.episode_terms(self, support, query, way, shot, episodes)
        return factored.pair_logits(self, classes, queries, episodes)  # (E, M, way)

    def precompute(self, maps: torch.Tensor, shot: int) -> dict[str, torch.Tensor]:
        """Per-video states of maps (n, C, T, H, W) for ``shot``-shot episodes (eval mode:
        exact only with BatchNorm's running statistics). See ``factored.video_states``."""
        if self.training:
            raise ValueError("precompute needs the head in eval mode (BatchNorm running stats)")
        maps, _ = self._prepare(maps, maps[:1], shot)
        return factored.video_states(self, maps, shot)

    def score_episodes(self, support: dict, query: dict, way: int, shot: int) -> torch.Tensor:
        """Logits (E, M, way) from per-video states: support {name: (E, way*shot, ...)}, query
        {name: (E, M, ...)}; only the shot mixing and the pair work run here."""
        episodes = support["mean"].shape[0]
        classes, queries = factored.state_terms(
            self, {k: v.flatten(0, 1) for k, v in support.items()},
            {k: v.flatten(0, 1) for k, v in query.items()}, way, shot, episodes)
        return factored.pair_logits(self, classes, queries, episodes)  # (E, M, way)

    @torch.no_grad()
    def explain(self, support: torch.Tensor, query: torch.Tensor, way: int, shot: int) -> dict:
        """The intermediates of one episode, in eval mode without gradients (N = way).

        Keys (a stage switched off leaves its keys out):
            ttm_support (way*shot, 2), ttm_query (M, 2): TTM's (a, b) per video.
            shot_attention (N, K, T, T): multi-shot A_k[x, y] (K > 1 only).
            prototypes (N, T, C), queries (M, T, C): spatial means of the prototypes and
                queries after TTM and the multi-shot step, before ACM.
            tc_attention (N, M, T, T): TC's A[n, m][x (prototype time), y (query time)].
            sc_offsets (N, M, T, 2): SC's offsets (ox, oy) in grid units, unperturbed
                (enumerate: the chosen integer shifts).
            f_s, f_q (N, M, T, C): the final pair features.
            distances (N, M), logits (M, N).
        Tensors are detached, on the input's device.
        """
        was_training = self.training
        self.eval()
        try:
            record: dict = {}
            self._run(support, query, way, shot, record)
        finally:
            self.train(was_training)
        return record

    def _run(self, support: torch.Tensor, query: torch.Tensor, way: int, shot: int,
             record: dict | None) -> torch.Tensor:
        self.check_episode(support, query, way, shot)
        support, query = self._prepare(support, query, shot)
        rec = record if record is not None else {}
        if self.ttm is not None:
            # support and query go through the locnet separately, as in the authors' code
            # (BatchNorm's training statistics are per batch)
            support, rec["ttm_support"] = self.ttm(support)  # (way*shot, C, T, H, W), (., 2)
            query, rec["ttm_query"] = self.ttm(query)  # (M, C, T, H, W), (M, 2)
        if shot > 1:
            protos, rec["shot_attention"] = self.shots(support, way, shot)  # (N, C, T, H, W)
            query = self.shots.project(query)  # (M, C, T, H, W)
        else:
            protos = support  # (N, C, T, H, W)
        if record is not None:
            rec["prototypes"] = protos.mean((-2, -1)).transpose(1, 2)  # (N, T, C)
            rec["queries"] = query.mean((-2, -1)).transpose(1, 2)  # (M, T, C)
        tc = None
        if self.tc is not None:
            protos, tc, rec["tc_attention"] = self.tc(protos, query)  # tc (N, M, C, T)
        if self.sc is not None:
            f_s, f_q, rec["sc_offsets"] = self.sc(protos, query, tc)  # (N, M, C, T) x 2
        else:
            n, m = protos.shape[0], query.shape[0]
            f_s = protos.mean((-2, -1))[:, None].expand(n, m, -1, -1)  # (N, M, C, T)
            f_q = query.mean((-2, -1))[None].expand(n, m, -1, -1)  # (N, M, C, T)
            f_q = f_q if tc is None else f_q + tc
        distances = frame_cosine_distance(f_s, f_q)  # (N, M)
        logits = -distances.t()  # (M, N)
        if record is not None:
            rec.update(f_s=f_s.transpose(2, 3), f_q=f_q.transpose(2, 3), distances=distances,
                       logits=logits)
            for key, value in rec.items():
                rec[key] = value.detach()
        return logits

    def _prepare(self, support: torch.Tensor, query: torch.Tensor, shot: int):
        """Refuse maps the head cannot take; cast to the weights' dtype."""
        channels, frames, height, width = support.shape[1:]
        if channels != self.channels:
            raise UserError(f"this head was built for C={self.channels} maps, not C={channels}")
        if (self.ttm is not None or self.sc is not None) and min(frames, height, width) < 4:
            raise UserError(f"TTM and SC need T, H, W >= 4; the maps are T={frames}, "
                            f"H={height}, W={width}")
        if shot > 1 and self.shots is None:
            raise UserError(f"this head was built for 1-shot episodes and has no multi-shot "
                            f"weights; build or load it with shot={shot}")
        dtype = next(self.parameters(), support).dtype
        return support.to(dtype), query.to(dtype)
