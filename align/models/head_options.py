"""A head's own options from text and JSON: what click does for a command's options. The
options are declared on the head's class (``Head.OPTIONS``) with ``cache.options``'
``named_option`` - the same ``Declaration``, ``Range`` and choices as a command option, refused
in the same one-line words. This module only reads values: ``train-heads --head-option
KEY=VALUE`` text converted by the declared type, and JSON values (sweep files, ``--set``,
checkpoints, a ``HeadConfig`` built in Python) checked to be of it.
"""

from __future__ import annotations

from cache import UserError
from cache.options import NamedOption

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")
TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def parse_value(option: NamedOption, text: str):
    """The value ``text`` (``--head-option``) means for ``option``, checked."""
    word = text.strip()
    try:
        value = [_convert(option.kind, part) for part in word.split(",")] if option.many \
            else _convert(option.kind, word)
    except ValueError:
        raise UserError(f"{option.label} must be {type_words(option)}, got {text!r}") from None
    return check_value(option, value)


def _convert(kind: type, word: str):
    if kind is bool:
        if word.lower() not in TRUE + FALSE:
            raise ValueError(word)
        return word.lower() in TRUE
    return kind(word)  # int("1.5") and float("x") raise ValueError


def check_value(option: NamedOption, value):
    """``value`` (a JSON value) if it is of ``option``'s type and within its declaration, as
    stored (an int given for a float becomes a float; a tuple, a list)."""
    if not _fits(option, value):
        raise UserError(f"{option.label} must be {type_words(option)}, got {value!r}")
    if option.kind is float:
        value = [float(v) for v in value] if option.many else float(value)
    elif option.many:
        value = list(value)
    why = option.refusal(value)
    if why:
        raise UserError(why)
    return value


def _fits(option: NamedOption, value) -> bool:
    if option.many:
        return isinstance(value, list | tuple) and len(value) > 0 and all(
            _fits_one(option.kind, v) for v in value)
    return _fits_one(option.kind, value)


def _fits_one(kind: type, value) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False  # True is an int to Python, not to a user
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def type_words(option: NamedOption) -> str:
    """The declared type in words, for refusals: "an integer", "integers separated by commas"."""
    if option.many:
        return {int: "integers", float: "numbers"}[option.kind] + " separated by commas"
    return TYPE_WORDS[option.kind]


def check_options(kind: str, declared: tuple[NamedOption, ...], given: dict,
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
            checked[name] = parse_value(option, value) if parse_text \
                else check_value(option, value)
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
