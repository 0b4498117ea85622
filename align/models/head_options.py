"""A head's own options, declared once on its class (``Head.OPTIONS``): name, type, default,
help and choices / least value. The registry, the CLI (``train-heads --head-option KEY=VALUE``,
``heads``), sweep files and checkpoints all read the declaration; a test checks that every
declared default equals the head constructor's.
"""

from __future__ import annotations

from dataclasses import dataclass

from cache import UserError

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")
TYPES = ("bool", "int", "float", "str", "ints")  # ints: a list of ints, "2,3" on the CLI


@dataclass(frozen=True)
class Option:
    """One hyperparameter of a head.

    Args:
        name: the keyword argument of the head's ``__init__``.
        type: one of ``TYPES``.
        default: the constructor's default (JSON value; a list for "ints").
        help: one line for ``cli.py heads``.
        choices: the allowed values (str options), or None.
        least: the smallest allowed value (numbers; every element for "ints"), or None.
    """

    name: str
    type: str
    default: object
    help: str
    choices: tuple | None = None
    least: float | None = None

    def parse(self, text: str):
        """The value ``text`` (from the CLI) means, checked."""
        word = text.strip()
        try:
            if self.type == "bool":
                if word.lower() not in TRUE + FALSE:
                    raise ValueError
                value = word.lower() in TRUE
            elif self.type == "int":
                value = int(word)
            elif self.type == "float":
                value = float(word)
            elif self.type == "ints":
                value = [int(part) for part in word.split(",")]
            else:
                value = word
        except ValueError:
            raise UserError(f"option {self.name!r} must be {self.describe_type()}, got "
                            f"{text!r}") from None
        return self.check(value)

    def check(self, value):
        """``value`` (a JSON value: a sweep file, a checkpoint) if it fits, as stored."""
        if not self._fits(value):
            raise UserError(f"option {self.name!r} must be {self.describe_type()}, got "
                            f"{value!r}")
        if self.type == "float":
            value = float(value)
        elif self.type == "ints":
            value = list(value)
        if self.choices is not None and value not in self.choices:
            raise UserError(f"option {self.name!r} must be one of "
                            f"{', '.join(map(str, self.choices))}; got {value!r}")
        numbers = value if self.type == "ints" else [value]
        if self.least is not None and any(n < self.least for n in numbers):
            raise UserError(f"option {self.name!r} must be >= {self.least:g}, got {value!r}")
        return value

    def _fits(self, value) -> bool:
        if self.type == "bool":
            return isinstance(value, bool)
        if self.type == "int":
            return isinstance(value, int) and not isinstance(value, bool)
        if self.type == "float":
            return isinstance(value, int | float) and not isinstance(value, bool)
        if self.type == "ints":
            return isinstance(value, list | tuple) and len(value) > 0 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value)
        return isinstance(value, str)

    def describe_type(self) -> str:
        return {"bool": "true or false", "int": "an integer", "float": "a number",
                "ints": "integers separated by commas", "str": "text"}[self.type]

    def describe(self) -> str:
        """``name (type, default X; choices / >= N): help`` for listings."""
        default = ",".join(map(str, self.default)) if self.type == "ints" else self.default
        if isinstance(default, bool):
            default = str(default).lower()
        limits = ""
        if self.choices is not None:
            limits = f"; one of {'|'.join(map(str, self.choices))}"
        elif self.least is not None:
            limits = f"; >= {self.least:g}"
        return f"{self.name}={default} ({self.type}{limits}): {self.help}"


def check_options(kind: str, declared: tuple[Option, ...], given: dict,
                  parse_text: bool = False) -> dict:
    """``given`` checked against a head's declared options: unknown names and bad values are
    one-line errors; ``parse_text``: the values are CLI text to parse by the declared type."""
    if not isinstance(given, dict):
        raise UserError(f"head options must be a mapping of names to values, not {given!r}")
    by_name = {o.name: o for o in declared}
    checked = {}
    for name, value in given.items():
        if name not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            raise UserError(f"{kind} has no option {name!r}; its options: {known}")
        option = by_name[name]
        try:
            checked[name] = option.parse(value) if parse_text else option.check(value)
        except UserError as e:
            raise UserError(f"{kind}: {e}") from None
    return checked


def parse_head_options(pairs: list[str] | tuple[str, ...]) -> dict:
    """``--head-option KEY=VALUE`` strings -> {KEY: VALUE text} (parsed later by the head's
    declaration, once the head is known)."""
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--head-option {pair!r}: expected KEY=VALUE, e.g. "
                            "--head-option ttm=false")
        options[key.strip().replace("-", "_")] = text
    return options
