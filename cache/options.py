"""One declaration per option: a config dataclass field carries its default, help, range and
choices; the click options of a command are generated from it.

    @dataclass
    class TrainConfig:
        shot: int = option(DEFAULT_SHOT, help="K support videos per class.", range=Range(1),
                           flag="--shots")

    @cli.command("train-heads")
    @options_from(TrainConfig)
    def train_heads(**options): ...

``check_ranges`` applies the same ranges to configs that do not come through click (sweep files,
``--set``, the Python API), so every entry point accepts exactly the values the CLI accepts.

An option that is not a config field - a head's own options (``Head.OPTIONS``, given as
``--head-option KEY=VALUE`` or a sweep file's ``head_options``) - is the same ``Declaration``
with its name and default (``named_option``): the same ranges, choices and one-line refusals.

Why a small decorator of ours and not a library: dataclass-click and clickdc (PyPI) generate click
options from dataclasses, but they declare click objects in the dataclass (click types in
``Annotated`` / ``field`` metadata), so every config module - extract's and align's engine, which
the CLI-free API imports - would import click; neither re-checks ranges for configs built
without click (sweep files, the API); and neither is in this project's environment. typer builds
its own commands from function signatures and does not compose with click decorators. This module
stays at the cache layer (the lowest one with configs: extract's and align's both import it) and
imports click only inside ``options_from``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields

from cache.errors import UserError

OPTION = "option"  # the dataclasses.field metadata key of a declaration


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

    def describe(self) -> str:
        """The range for listings: ">= 1", "> 0", "<= 1" or "in [0, 1)"."""
        if self.high is None and self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None and self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Declaration:
    """What the CLI needs of one config field beyond its name and default.

    Args:
        help: the option's help text (the one description of the field).
        range: the values a number takes (None: any).
        choices: the values a string takes (None: any); a function returning them where
            the set grows at run time (a registry: heads registered after import).
        flag: the long flag (None: ``--field-name``); aliases: short ones, e.g. ("-T",).
        kind: the value's type for click: int, float, str or bool (None: from the default).
        negatable: a bool shown as ``--x/--no-x`` (else a plain ``--x`` flag that sets True).
        metavar: the value's name in --help.
        show_default: print "[default: ...]" (None: when the default is not None / False).
        path: the value is a path: "any", or "dir" (an existing directory; click refuses
            others before the command runs).
        check: a function of the value that raises ``UserError`` where it is refused (e.g.
            a backbone name not in the registry); the CLI calls it while parsing.
    """

    help: str | None = None
    range: Range | None = None
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    kind: type | None = None
    negatable: bool = False
    metavar: str | None = None
    show_default: bool | None = None
    path: str | None = None
    check: Callable[[object], None] | None = None

    def flag_of(self, name: str) -> str:
        return self.flag or f"--{name.replace('_', '-')}"

    def choices_now(self) -> tuple[str, ...] | None:
        """The choices as of now (a registry's are read when asked)."""
        return tuple(self.choices()) if callable(self.choices) else self.choices

    def refusal(self, label: str, value) -> str | None:
        """Why ``value`` is out of the declared range or choices, starting with ``label``
        (e.g. "--shots"); None: it is accepted."""
        if self.range is not None and not isinstance(value, bool) \
                and isinstance(value, int | float):
            return self.range.refusal(label, value)
        if self.choices is not None and value is not None and value not in self.choices_now():
            return f"{label} must be one of {', '.join(self.choices_now())}"
        return None


def option(default=None, *, help: str | None = None, range: Range | None = None,
           choices=None, flag: str | None = None, aliases: tuple[str, ...] = (),
           kind: type | None = None, negatable: bool = False, metavar: str | None = None,
           show_default: bool | None = None, path: str | None = None,
           check: Callable[[object], None] | None = None):
    """A dataclass field whose default, help, range and choices are its CLI option's
    (``Declaration`` describes the arguments); ``default=MISSING``: a required option."""
    if path not in (None, "any", "dir"):
        raise ValueError(f"path is 'any' or 'dir', not {path!r}")
    declared = Declaration(help=help, range=range, choices=_frozen(choices), flag=flag,
                           aliases=tuple(aliases), kind=kind, negatable=negatable,
                           metavar=metavar, show_default=show_default, path=path, check=check)
    return field(default=default, metadata={OPTION: declared})


def _frozen(choices):
    return choices if choices is None or callable(choices) else tuple(choices)


@dataclass(frozen=True)
class NamedOption:
    """An option declared by name, not as a config field: a head's own option
    (``Head.OPTIONS``). Its value is a bool, int, float or str, or a list of ints / floats
    (a list default: every element is checked against the range).

    Args:
        name: the option's name (a keyword argument of the head's ``__init__``).
        default: its default (a JSON value).
        declared: help, range and choices, as a config field's (``Declaration``).
    """

    name: str
    default: object
    declared: Declaration

    @property
    def many(self) -> bool:
        """Whether the value is a list (e.g. TRX's tuple sizes, "2,3" on the command line)."""
        return isinstance(self.default, list)

    @property
    def kind(self) -> type:
        """The type of the value, of each element where it is a list."""
        one = self.default[0] if self.many else self.default
        return self.declared.kind or type(one)

    @property
    def label(self) -> str:
        """How a refusal names the option: ``option 'sc_mode'``."""
        return f"option {self.name!r}"

    def refusal(self, value) -> str | None:
        """Why ``value`` (of the declared type) is out of range or choices; None: accepted."""
        for one in value if self.many else [value]:
            why = self.declared.refusal(self.label, one)
            if why:
                return why
        return None

    def describe(self) -> str:
        """``name=default (type; limits): help``, one line of a listing (``cli.py heads``)."""
        default = ",".join(map(str, self.default)) if self.many else self.default
        if isinstance(default, bool):
            default = str(default).lower()
        kind = self.kind.__name__ + ("s" if self.many else "")
        limits = ""
        if self.declared.choices is not None:
            limits = f"; one of {'|'.join(self.declared.choices_now())}"
        elif self.declared.range is not None:
            limits = f"; {self.declared.range.describe()}"
        return f"{self.name}={default} ({kind}{limits}): {self.declared.help}"


def named_option(name: str, default, *, help: str, range: Range | None = None,
                 choices=None, kind: type | None = None) -> NamedOption:
    """An option declared by name (a head's ``OPTIONS``): ``default``, ``help``, ``range``
    and ``choices`` mean what they mean in ``option``; ``kind``: the value's type where the
    default does not say it (each element's, for a list)."""
    return NamedOption(name, default, Declaration(help=help, range=range,
                                                  choices=_frozen(choices), kind=kind))


def declared_fields(config_class, exclude=()) -> list:
    """The fields of ``config_class`` declared with ``option``, in order, less ``exclude``."""
    return [f for f in fields(config_class) if OPTION in f.metadata and f.name not in exclude]


def check_ranges(config_class, values: dict, where: str = "") -> None:
    """Refuse, in one line, the first of ``values`` (fields of ``config_class``) out of its
    declared range or choices; ``where`` (e.g. "f.toml: run 'a'") starts the message."""
    for f in declared_fields(config_class):
        declared = f.metadata[OPTION]
        why = declared.refusal(declared.flag_of(f.name), values.get(f.name))
        if why:
            raise UserError(f"{where}: {why}" if where else why)


def click_type(declared: Declaration, default):
    """The click type of a declared option: its range or choices, else its plain type."""
    import click

    kind = declared.kind or (type(default) if default is not None else str)
    if declared.path is not None:
        return click.Path(exists=True, file_okay=False) if declared.path == "dir" \
            else click.Path()
    if declared.choices is not None:
        return click.Choice(declared.choices_now())
    if declared.range is None:
        return kind
    span = declared.range
    if kind is int:
        return click.IntRange(min=span.low, max=span.high, min_open=span.low_open,
                              max_open=span.high_open)
    return click.FloatRange(min=span.low, max=span.high, min_open=span.low_open,
                            max_open=span.high_open)


def click_option(f):
    """The ``click.option`` decorator of one declared field (its parameter is the field's name)."""
    import click

    declared = f.metadata[OPTION]
    default = None if f.default is MISSING else f.default
    flag = declared.flag_of(f.name)
    show = declared.show_default
    if show is None:
        show = default is not None and default is not False
    if isinstance(default, bool) or declared.kind is bool:
        decls = [f"{flag}/--no-{flag[2:]}"] if declared.negatable else [flag]
        return click.option(*decls, *declared.aliases, f.name, is_flag=True,
                            default=bool(default), show_default=show, help=declared.help)
    # a required option gets no default at all: click 8.3 takes an explicit None as a value
    given = {"required": True} if f.default is MISSING else {"default": default}
    return click.option(flag, *declared.aliases, f.name, type=click_type(declared, default),
                        show_default=show, help=declared.help, metavar=declared.metavar,
                        callback=click_callback(declared.check), **given)


def click_callback(check):
    """The click callback of a declared ``check`` (None: none): its ``UserError`` becomes
    click's one-line "Invalid value for '--x'" usage error."""
    if check is None:
        return None
    import click

    def callback(ctx, param, value):
        try:
            check(value)
        except UserError as e:
            raise click.BadParameter(e.message) from None
        return value
    return callback


def options_from(config_class, exclude=()):
    """A decorator adding the click options of every declared field of ``config_class`` (less
    ``exclude``), in field order, each passed to the command under its field's name."""
    def decorate(command):
        for f in reversed(declared_fields(config_class, exclude)):
            command = click_option(f)(command)
        return command
    return decorate
