"""A sweep's spec: what it runs. Presets (``table3``, ``table4``, ``heads``, ``table2``,
``shots``) and sweep files (TOML or JSON) listing runs as train-heads option sets, validated
against ``TrainConfig``'s fields by name (so options added to training pass straight through)."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from align.models import HEADS, check_head_options, head_class, head_names
from align.options import DEFAULT_SHOT
from align.recipes import TrainConfig
from cache import UserError
from cache.options import check_ranges

# TrainConfig fields a run may not set: the sweep decides them (and says with which option)
SWEEP_OWNED = {"cache": "--cache", "seed": "--seeds", "out": "--out",
               "dataset": "the cache's attributes"}
ALIASES = {"shots": "shot"}  # train-heads' option name -> TrainConfig field
EVAL_OPTIONS = ("batch_episodes", "preload", "workers", "amp")  # a run's options evaluate uses
SPEC_KEYS = ("title", "shots", "reference", "defaults", "run")


# ------------------------------------------------------------------------------ options
def option_names() -> list[str]:
    """The train-heads options a sweep run may set: TrainConfig's fields, read at run time."""
    return sorted(f.name for f in fields(TrainConfig) if f.name not in SWEEP_OWNED)


def _type_ok(value, annotation: str) -> bool:
    """Whether ``value`` (from TOML / JSON) fits a field annotated like ``int | None``."""
    names = {t.strip() for t in str(annotation).split("|")}
    if not names <= {"bool", "int", "float", "str", "None"}:
        return True  # a type this check does not know: TrainConfig's users decide
    if value is None:
        return "None" in names
    if isinstance(value, bool):
        return "bool" in names
    if isinstance(value, int):
        return bool(names & {"int", "float"})
    if isinstance(value, float):
        return "float" in names
    return isinstance(value, str) and "str" in names


def normalise_options(raw: dict, where: str) -> dict:
    """train-heads options (dashes or underscores, ``shots`` for ``shot``) -> TrainConfig
    fields, checked by name and type; ``where`` starts the one-line error."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    known = option_names()
    options = {}
    for key, value in raw.items():
        name = ALIASES.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if name in SWEEP_OWNED:
            raise UserError(f"{where}: option {key!r} is set by the sweep ({SWEEP_OWNED[name]})")
        if name not in types:
            raise UserError(f"{where}: unknown option {key!r}; known: {', '.join(known)}")
        if not _type_ok(value, types[name]):
            raise UserError(f"{where}: option {key!r} must be {types[name]}, got {value!r}")
        options[name] = value
    if "head" in options and options["head"] not in HEADS:
        raise UserError(f"{where}: unknown head {options['head']!r}; registered: "
                        f"{', '.join(head_names())}")
    if "head_options" in options and not isinstance(options["head_options"], dict):
        raise UserError(f"{where}: head_options must be a table of the head's options, e.g. "
                        "head_options = {sc = false}")
    if "shot" in options and (not isinstance(options["shot"], int) or options["shot"] < 1):
        raise UserError(f"{where}: shots must be a positive integer, got {options['shot']!r}")
    check_ranges(TrainConfig, options, where)  # train-heads' ranges, from one declaration
    return options


def parse_assignments(pairs: list[str] | tuple[str, ...]) -> dict:
    """``--set key=value`` strings -> options; values read as JSON (6, 0.01, true), else text.
    ``head_options.KEY=VALUE`` sets one of the head's own options (``cli.py heads``)."""
    raw: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set epochs=6")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        prefix, dot, option = key.replace("-", "_").partition(".")
        if dot and prefix == "head_options":
            raw.setdefault("head_options", {})[option] = value
        else:
            raw[key] = value
    return normalise_options(raw, "--set")


def run_options(run: RunSpec, overrides: dict) -> dict:
    """A run's train-heads options with ``--set``'s over them. ``--set``'s head options go to
    the runs whose head declares them (``sweep table3 --set head_options.sc_mode=grid`` leaves
    the ProtoNet row as it is); one that no run's head declares is refused in ``check_set``."""
    options = {**run.options, **overrides}
    head = options.get("head", TrainConfig.head)
    declared = {o.name for o in head_class(head).OPTIONS}
    mine = {k: v for k, v in overrides.get("head_options", {}).items() if k in declared}
    head_options = {**run.options.get("head_options", {}), **mine}
    options.pop("head_options", None)
    if head_options:
        try:
            options["head_options"] = check_head_options(head, head_options)
        except UserError as e:
            raise UserError(f"--set: run {run.name!r}: {e}") from None
    return options


def check_set(spec: SweepSpec, overrides: dict) -> None:
    """Refuse ``--set head_options.X`` that no run's head declares (a typo would do nothing)."""
    heads = {r.options.get("head", overrides.get("head", TrainConfig.head)) for r in spec.runs}
    declared = {o.name for h in heads for o in head_class(h).OPTIONS}
    unknown = sorted(set(overrides.get("head_options", {})) - declared)
    if unknown:
        raise UserError(f"--set: no head of this sweep ({', '.join(sorted(heads))}) has option "
                        f"{unknown[0]!r}; their options: {', '.join(sorted(declared))}")


# ------------------------------------------------------------------------------ the spec
@dataclass(frozen=True)
class RunSpec:
    """One row of the table: a name, its train-heads options, the row it is compared with."""

    name: str
    options: dict
    vs: str | None = None


@dataclass
class SweepSpec:
    """What a preset or sweep file asks for (before seeds, K values and the cache).

    Args:
        title: the preset's name or the file's ``title`` (else its stem).
        runs: the rows, in table order.
        shots: the K values every run without its own ``shots`` is repeated over.
        reference: the row others are compared with unless they name their own ``vs``.
    """

    title: str
    runs: list[RunSpec]
    shots: list[int] = field(default_factory=lambda: [DEFAULT_SHOT])
    reference: str | None = None


def _ta2n(ttm: bool, tc: bool, sc: bool) -> dict:
    return {"head": "ta2n", "head_options": {"ttm": ttm, "tc": tc, "sc": sc}}


def _heads_payload(title: str, heads: list[str], shots: list[int]) -> dict:
    reference = "protonet" if "protonet" in heads else heads[0]
    return {"title": title, "shots": shots, "reference": reference,
            "run": [{"name": h, "head": h} for h in heads]}


def preset_payload(name: str, heads: list[str] | None = None) -> dict:
    """A preset as a sweep file's payload. ``table2`` reads the registry now, so heads
    registered later join it; ``heads`` overrides the heads of heads / table2 / shots."""
    if heads is not None and name not in ("heads", "table2", "shots"):
        raise UserError(f"--heads applies to the heads, table2 and shots presets, not {name!r}")
    if name == "table3":  # the paper's Table 3 (5-way 1-shot): each module switched on in turn
        return {"title": "table3", "shots": [1], "run": [
            {"name": "no module (ProtoNet)", "head": "protonet"},
            {"name": "TTM", **_ta2n(True, False, False)},
            {"name": "TC", **_ta2n(False, True, False)},
            {"name": "TC + SC", **_ta2n(False, True, True), "vs": "TC"},
            {"name": "TTM + TC", **_ta2n(True, True, False), "vs": "TC"},
            {"name": "TTM + TC + SC", **_ta2n(True, True, True), "vs": "TTM + TC"}]}
    if name == "table4":  # the paper's Table 4 (5-way 1-shot): SC's designs against the mask
        return {"title": "table4", "shots": [1], "reference": "Mask (ours)", "run": [
            {"name": name, "head": "ta2n", "head_options": {"sc_mode": mode}}
            for name, mode in (("Enumerate", "enumerate"), ("Grid-based", "grid"),
                               ("Mask (ours)", "mask"))]}
    if name == "heads":
        return _heads_payload("heads", heads or ["protonet", "otam", "ta2n"], [1])
    if name == "table2":
        return _heads_payload("table2", heads or head_names(), [1])
    if name == "shots":
        return _heads_payload("shots", heads or ["protonet", "ta2n"], [1, 2, 3, 4, 5])
    raise UserError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")


PRESETS = ("table3", "table4", "heads", "table2", "shots")


def read_sweep_file(path: Path) -> dict:
    """A TOML or JSON sweep file's payload (one-line errors for unreadable files)."""
    if path.suffix.lower() not in (".toml", ".json"):
        raise UserError(f"{path}: a sweep file ends in .toml or .json")
    try:
        text = path.read_text()
        payload = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise UserError(f"{path}: not valid {kind} ({e})") from None
    if not isinstance(payload, dict):
        raise UserError(f"{path}: expected a table of {', '.join(SPEC_KEYS)}")
    payload.setdefault("title", path.stem)
    return payload


def load_spec(source: str, heads: list[str] | None = None) -> SweepSpec:
    """A preset name or a sweep file -> a checked ``SweepSpec``."""
    if source in PRESETS:
        return parse_spec(preset_payload(source, heads), source)
    path = Path(source)
    if not path.exists():
        raise UserError(f"{source!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    if heads is not None:
        raise UserError("--heads applies to the heads, table2 and shots presets, not to a file")
    return parse_spec(read_sweep_file(path), str(path))


def _shots(value, where: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values):
        raise UserError(f"{where}: shots must be a positive integer or a list of them, "
                        f"got {value!r}")
    return sorted(set(values))


def parse_spec(payload: dict, where: str) -> SweepSpec:
    """Check a sweep payload: known top-level keys, named runs, options, ``vs`` targets."""
    unknown = sorted(set(payload) - set(SPEC_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(SPEC_KEYS)}")
    defaults = payload.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UserError(f"{where}: 'defaults' must be a table of train-heads options")
    defaults = normalise_options(defaults, f"{where}: defaults")
    entries = payload.get("run")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{where}: no runs: add [[run]] tables (TOML) or a \"run\" list (JSON)")
    runs = [_parse_run(entry, i, defaults, where) for i, entry in enumerate(entries)]
    _check_names(runs, where)
    spec = SweepSpec(title=str(payload.get("title") or "sweep"), runs=runs,
                     shots=_shots(payload.get("shots", DEFAULT_SHOT), where),
                     reference=payload.get("reference"))
    names = [r.name for r in runs]
    for target, whose in [(spec.reference, "reference")] + [(r.vs, f"run {r.name!r}: vs")
                                                           for r in runs]:
        if target is not None and target not in names:
            raise UserError(f"{where}: {whose} {target!r} is not a run; runs: {', '.join(names)}")
    return spec


def _parse_run(entry, index: int, defaults: dict, where: str) -> RunSpec:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: run {index + 1} is not a table of options")
    entry = dict(entry)
    name, vs = entry.pop("name", None), entry.pop("vs", None)
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{where}: run {index + 1} needs a name (name = \"...\")")
    options = {**defaults, **normalise_options(entry, f"{where}: run {name!r}")}
    head_options = {**defaults.get("head_options", {}), **options.get("head_options", {})}
    if head_options or "head_options" in options:  # checked against the run's own head
        try:
            options["head_options"] = check_head_options(options.get("head", "ta2n"),
                                                         head_options)
        except UserError as e:
            raise UserError(f"{where}: run {name!r}: {e}") from None
    return RunSpec(name=name.strip(), options=options, vs=vs)


def slug(name: str) -> str:
    """A run's folder name: lower case, runs of other characters as one dash."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"


def _check_names(runs: list[RunSpec], where: str) -> None:
    seen: dict[str, str] = {}
    for run in runs:
        if run.name in seen.values():
            raise UserError(f"{where}: two runs are named {run.name!r}")
        other = seen.get(slug(run.name))
        if other is not None:
            raise UserError(f"{where}: runs {other!r} and {run.name!r} would share the folder "
                            f"{slug(run.name)!r}; rename one")
        seen[slug(run.name)] = run.name


