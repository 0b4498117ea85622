"""The head interface: what every few-shot head provides, so that training, evaluation, reports
and the CLI never ask a head what it can do (no ``hasattr``), and a new head is one module, one
line in ``align.models.registry.HEADS`` and its tests.

Every head is called as ``head(support, query, way, shot)``: support (way*shot, C, T, H, W)
class-major (class 0's shots, then class 1's ...), query (M, C, T, H, W); it returns logits
(M, way) = minus the distance of each query to each class. ``forward_episodes`` does the same
for E stacked episodes.

Evaluation with a fixed head: a head that sets ``precomputes`` computes every
episode-independent tensor once per video (``precompute(maps, shot)`` -> a dict of tensors with
one row per video, the "state"), and scores episodes from the states of their videos
(``score_episodes``). The defaults (state = the maps, score = ``forward_episodes``) keep a head
that overrides neither working unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from align.models.head_options import check_options
from cache import UserError
from cache.options import NamedOption


@dataclass
class HeadConfig:
    """How a head was built; stored as JSON with every checkpoint and run.

    Only what every head has: ``frames``, ``height`` and ``width`` record the maps the head was
    built for; ``shot`` is K (TA2N holds multi-shot prototype weights when K > 1). ``options``
    holds the head's own hyperparameters, as its class declares them (``Head.OPTIONS``; JSON
    values; a missing one takes its declared default). A head's ``config`` records every one.
    """

    kind: str = "ta2n"
    channels: int = 2048
    frames: int = 8
    height: int = 7
    width: int = 7
    shot: int = 1
    options: dict = field(default_factory=dict)

    def validate(self) -> HeadConfig:
        """Checks what a config can check alone; the registry checks ``kind`` and the head's
        class its ``options``."""
        if not isinstance(self.options, dict):
            raise UserError(f"head options must be a mapping of names to values, not "
                            f"{self.options!r}")
        sizes = {k: getattr(self, k) for k in ("channels", "frames", "height", "width", "shot")}
        bad = {k: v for k, v in sizes.items() if int(v) < 1}
        if bad:
            raise UserError(f"head sizes must be positive: {bad}")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> HeadConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown head config keys {unknown}")
        return cls(**data).validate()

    @property
    def sizes(self) -> dict:
        """The map and episode sizes every head's constructor takes."""
        return dict(channels=self.channels, frames=self.frames, height=self.height,
                    width=self.width, shot=self.shot)


class Head(nn.Module):
    """The base class of every head. A subclass sets ``kind`` (its registry name) and
    ``training_free``, and implements ``forward`` and ``explain``; the rest has defaults.

    Provides:
        forward(support, query, way, shot) -> logits (M, way).
        forward_episodes(support (E, way*shot, ...), query (E, M, ...), way, shot)
            -> logits (E, M, way); default: a loop over ``forward``.
        precomputes: whether evaluation should use precompute + score_episodes (default False:
            evaluation streams the maps into ``forward_episodes``).
        precompute(maps (n, C, T, H, W), shot) -> state {name: (n, ...)}, eval mode only.
        score_episodes(support_state {name: (E, way*shot, ...)}, query_state {name: (E, M, ...)},
            way, shot) -> logits (E, M, way).
        compile_entry_points(): torch.compile of the batched entry points.
        shot_rule: how a class is built from K support videos ("any" by default; classify's
            rule for classes of different K, see classify/scoring.py).
        explain(support, query, way, shot) -> dict of detached intermediates (eval, no grad).
        decay(): the per-epoch schedule step of a head's own (TA2N halves SC's perturbation).
        trainable: whether the head has parameters that learn.
        OPTIONS: the head's own hyperparameters (``cache.options.named_option``: name,
            default, help, range / choices, as a command option's), keyword arguments of its
            ``__init__`` after the sizes; the resolved values are kept in ``self.options``.
        config: the ``HeadConfig`` that rebuilds it (``from_config``).
        reset_parameters(generator): the seeded initialisation.

    Args:
        channels: C of the maps.
        frames: T the head is built for (recorded).
        height: H the head is built for (recorded).
        width: W the head is built for (recorded).
        shot: K of the episodes it is built for.
    """

    kind: str = ""
    training_free: bool = False  # True: evaluate can score it without train-heads
    precomputes: bool = False  # True: evaluate scores episodes from per-video states
    OPTIONS: tuple[NamedOption, ...] = ()

    def __init__(self, channels: int = 2048, frames: int = 8, height: int = 7, width: int = 7,
                 shot: int = 1):
        super().__init__()
        self.channels, self.frames, self.height, self.width = channels, frames, height, width
        self.shot = shot
        self.options: dict = {}  # the resolved values of OPTIONS, set by each head

    @classmethod
    def check_options(cls, options: dict, parse_text: bool = False) -> dict:
        """``options`` checked against ``OPTIONS`` (one-line errors naming the known ones);
        ``parse_text``: the values are CLI text, parsed by their declared types."""
        return check_options(cls.kind, cls.OPTIONS, options, parse_text)

    @classmethod
    def default_options(cls) -> dict:
        return {o.name: o.default for o in cls.OPTIONS}

    @classmethod
    def from_config(cls, cfg: HeadConfig) -> Head:
        """The head ``cfg`` describes (weights at their default init)."""
        return cls(**cfg.sizes, **cls.check_options(cfg.options))

    @property
    def config(self) -> HeadConfig:
        return HeadConfig(kind=self.kind, channels=self.channels, frames=self.frames,
                          height=self.height, width=self.width, shot=self.shot,
                          options=dict(self.options))

    def forward(self, support: torch.Tensor, query: torch.Tensor, way: int,
                shot: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward")

    def explain(self, support: torch.Tensor, query: torch.Tensor, way: int, shot: int) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must define explain")

    def forward_episodes(self, support: torch.Tensor, query: torch.Tensor, way: int,
                         shot: int) -> torch.Tensor:
        """Logits (E, M, way) of E episodes: support (E, way*shot, ...), query (E, M, ...)."""
        return torch.stack([self(s, q, way, shot) for s, q in zip(support, query)])

    def precompute(self, maps: torch.Tensor, shot: int) -> dict[str, torch.Tensor]:
        """The per-video state of maps (n, C, T, H, W) for ``shot``-shot episodes; by default
        the maps themselves."""
        return {"maps": maps}

    def score_episodes(self, support: dict[str, torch.Tensor], query: dict[str, torch.Tensor],
                       way: int, shot: int) -> torch.Tensor:
        """Logits (E, M, way) from the states of E episodes' videos: support {name: (E,
        way*shot, ...)}, query {name: (E, M, ...)}; by default ``forward_episodes`` on maps."""
        return self.forward_episodes(support["maps"], query["maps"], way, shot)

    def compile_entry_points(self, **options) -> Head:
        """Replace forward_episodes, precompute and score_episodes of this instance by their
        ``torch.compile`` versions (same weights; the state dict is unchanged)."""
        for name in ("forward_episodes", "precompute", "score_episodes"):
            setattr(self, name, torch.compile(getattr(self, name), **options))
        return self

    def decay(self) -> None:
        """A schedule step of the head's own, once per ``decay_every`` epochs; none by default."""

    @property
    def shot_rule(self) -> str:
        """How the head builds a class from K support videos: "any" (one prototype from any K,
        the default), "many" (K >= 2 through weights that take any K >= 2; K = 1 would take
        another path) or "one" (K = 1 only: no multi-shot weights)."""
        return "any"

    @property
    def trainable(self) -> bool:
        """Whether the head has parameters to train (ProtoNet and OTAM have none)."""
        return any(p.requires_grad for p in self.parameters())

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Heads without parameters have nothing to initialise."""

    def check_episodes(self, support: torch.Tensor, query: torch.Tensor, way: int,
                       shot: int) -> None:
        """Raises ValueError unless support / query are E episodes' (E, n, C, T, H, W) maps."""
        if support.dim() != 6 or query.dim() != 6 or support.shape[0] != query.shape[0]:
            raise ValueError(f"episode batches must be (E, n, C, T, H, W) with one E; got "
                             f"support {tuple(support.shape)} and query {tuple(query.shape)}")
        self.check_episode(support[0], query[0], way, shot)

    def check_episode(self, support: torch.Tensor, query: torch.Tensor, way: int,
                      shot: int) -> None:
        """Raises ValueError unless support / query are one episode's (n, C, T, H, W) maps."""
        if support.dim() != 5 or query.dim() != 5:
            raise ValueError(f"maps must be (n, C, T, H, W); got support {tuple(support.shape)}"
                             f" and query {tuple(query.shape)}")
        if support.shape[0] != way * shot:
            raise ValueError(f"support holds {support.shape[0]} videos, not way*shot = "
                             f"{way}*{shot}")
        if support.shape[1:] != query.shape[1:]:
            raise ValueError(f"support {tuple(support.shape[1:])} and query "
                             f"{tuple(query.shape[1:])} maps differ in (C, T, H, W)")
