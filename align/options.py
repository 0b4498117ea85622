"""The one declaration of the range of every numeric train-heads option.

cli.py makes train-heads' click types from ``OPTION_RANGES`` (``click_type``), and
``TrainConfig._check`` applies ``check_ranges`` to configs from anywhere else (sweep files,
``--set``, the API): a sweep accepts exactly the values the CLI accepts. Light on purpose: the CLI
imports it at start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cache import UserError


@dataclass(frozen=True)
class Range:
    """The values a numeric option takes: [low, high], either end open or absent (None)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def refusal(self, option: str, value) -> str | None:
        """Why ``value`` is refused for ``--option`` (None: it is in range)."""
        if value is None:
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"{option} must be a finite number, not {value}"
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open
                                        else value <= self.high)
        if low_ok and high_ok:
            return None
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{option} must be in {left}{low}, {high}{right}, not {value}"


OPTION_RANGES = {
    "shot": Range(1), "way": Range(2), "queries": Range(1),
    "lr": Range(0, low_open=True), "warmup": Range(0), "lr_step": Range(1), "lr_gamma": Range(0),
    "momentum": Range(0, 1), "weight_decay": Range(0), "epochs": Range(1),
    "episodes_per_epoch": Range(1), "tasks_per_batch": Range(1),
    "dropout": Range(0, 1, high_open=True), "patience": Range(0), "decay_every": Range(1),
    "val_every": Range(1), "val_episodes": Range(0), "val_queries": Range(1),
    "batch_episodes": Range(1), "micro_batch": Range(1), "workers": Range(0),
}


def option_flag(name: str) -> str:
    """The train-heads flag of a TrainConfig field (shot -> --shots)."""
    return "--shots" if name == "shot" else f"--{name.replace('_', '-')}"


def check_ranges(values: dict, where: str = "") -> None:
    """Refuse, in one line, the first value of ``values`` (TrainConfig fields) out of its
    declared range; ``where`` (e.g. "f.toml: run 'a'") starts the message."""
    for name, value in values.items():
        declared = OPTION_RANGES.get(name)
        if declared is not None and not isinstance(value, bool) \
                and isinstance(value, int | float):
            why = declared.refusal(option_flag(name), value)
            if why:
                raise UserError(f"{where}: {why}" if where else why)


def click_type(name: str):
    """The click type of the option of TrainConfig field ``name``: its declared range."""
    import click

    declared = OPTION_RANGES[name]
    integral = all(v is None or float(v).is_integer() for v in (declared.low, declared.high)) \
        and name not in FLOAT_OPTIONS
    kind = click.IntRange if integral else click.FloatRange
    extra = {} if integral else {"min_open": declared.low_open, "max_open": declared.high_open}
    return kind(min=declared.low, max=declared.high, **extra)


FLOAT_OPTIONS = ("lr", "lr_gamma", "momentum", "weight_decay", "dropout")
