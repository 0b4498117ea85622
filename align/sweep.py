"""Sweeps (`python cli.py sweep`): a whole paper table - many heads or ablations, several seeds -
as one command, on identical test episodes, with paired significance tests.

This module owns:

* the sweep's **spec**: presets (``table3``, ``table4``, ``heads``, ``table2``, ``shots``) and
  sweep files (TOML or JSON) listing runs as train-heads option sets, validated against
  ``TrainConfig``'s fields by name (so options added to training pass straight through);
* the **plan**: one run per (row, K, seed), each a normal run directory under the sweep folder
  (``train`` writes config.json, metrics.csv, best.pt, last.pt; the sweep adds ``sweep-run.json``
  and the ``eval.json`` report of ``evaluate``);
* the **test episodes**: saved once per (split, way, K, queries, episodes, seed) in the sweep
  folder and replayed for every run, so the runs of one seed are scored on identical tasks;
* **resume**: a rerun skips runs whose report exists, resumes runs that have last.pt
  (``train(resume=...)``), and refuses a run whose recorded options differ, naming the difference;
* **parallelism** through joblib: a run's result is a function of its config alone (seeded
  episodes, seeded init, fixed torch threads), so serial, ``--jobs N`` processes and one process
  per ``--devices`` entry give the same numbers; with ``scheduler`` the runs are tasks on a Dask
  cluster instead (align/cluster.py);
* the **outputs**: sweep.csv (a line per run and seed), sweep.md (the paper-style table, with
  mean +- std over seeds and the paired test of each row against its reference, align/stats.py),
  sweep.json; the bar chart is drawn by the ``draw`` callback (align/reports/sweep.py).
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from joblib import Parallel, delayed

from align.episodes import EpisodeSampler, Stream, save_episodes
from align.evaluate import EvalConfig, evaluate
from align.models import HEADS, check_head_options, head_class, head_names
from align.options import DEFAULT_SHOT, DEFAULT_WAY
from align.runs import RUNS_ROOT, HeadSource, load_head_source
from align.stats import PAIRED_EPISODES, PAIRED_SEEDS, format_p, paired_test, seed_spread
from align.train import TrainConfig, check_ranges, train, upgrade_train_payload
from cache import FeatureCache, UserError
from cache.atomic import atomic_path, write_json, write_text
from cache.latest import resolve_cache
from cache.paths import MARKER, claim_folder

RUN_FILE = "sweep-run.json"  # in each run directory: what the sweep asked for, and its result
REPORT_FILE = "eval.json"  # in each run directory: evaluate's report on the sweep's episodes
# TrainConfig fields a run may not set: the sweep decides them (and says with which option)
SWEEP_OWNED = {"cache": "--cache", "seed": "--seeds", "out": "--out",
               "dataset": "the cache's attributes"}
ALIASES = {"shots": "shot"}  # train-heads' option name -> TrainConfig field
EVAL_OPTIONS = ("batch_episodes", "preload", "workers", "amp")  # a run's options evaluate uses
SPEC_KEYS = ("title", "shots", "reference", "defaults", "run")
CSV_FIELDS = ("run", "shot", "seed", "head", "options", "accuracy", "ci95", "episodes",
              "best_val_acc", "epochs_done", "episodes_file", "run_dir", "device",
              "train_time_s", "eval_time_s", "best_epoch", "episodes_to_best", "train_s_to_best")
TIMING_FIELDS = ("train_time_s", "eval_time_s", "train_s_to_best")


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
    the ProtoNet row as it is); one that no run's head declares is refused in ``_check_set``."""
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


def _check_set(spec: SweepSpec, overrides: dict) -> None:
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


# ------------------------------------------------------------------------------ the plan
@dataclass
class SweepConfig:
    """How a sweep runs (the spec says what).

    Args:
        cache: the feature cache (None: the most recently written one).
        out: the sweep folder (None: runs/sweep-<title>-<cache name>).
        seeds: each run is trained and tested once per seed.
        shots: K values (None: the spec's).
        episodes, way, queries, split: the saved test episodes every run is scored on.
        overrides: train-heads options applied over every run's (``--set``).
        reference: compare every row with this one (None: each run's ``vs``, else the spec's
            reference, else the first row).
        devices: torch device names; more than one: one worker process per entry.
        jobs: worker processes on a single device (1: in this process).
        threads: torch threads per run, fixed so that results do not depend on ``jobs``.
        backend: the joblib backend ("loky" for local processes; "dask" / "ray" inside their
            clients spread the runs over a cluster).
        scheduler: a Dask scheduler (tcp://HOST:PORT, a scheduler file) or local:N: the runs
            are tasks on its workers (align/cluster.py); devices then names one device, which
            each worker resolves for itself.
    """

    cache: str | None = None
    out: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    shots: tuple[int, ...] | None = None
    episodes: int = 5000
    way: int = DEFAULT_WAY
    queries: int = 1
    split: str = "test"
    overrides: dict = field(default_factory=dict)
    reference: str | None = None
    devices: tuple[str, ...] = ("cpu",)
    jobs: int = 1
    threads: int = 1
    backend: str = "loky"
    scheduler: str | None = None


@dataclass
class RunPlan:
    """One (row, K, seed) of a sweep, everything a worker process needs (plain, picklable).

    Args:
        index, total: its place in the sweep (for progress lines).
        name, shot, seed, head: the row, K, the seed of training and test episodes, the head.
        training_free: evaluated without training (ProtoNet, OTAM).
        train: TrainConfig fields (cache, seed, shot, out included).
        requested: what identifies the run on disk (compared on rerun).
        run_dir, episodes_file, workdir: absolute paths, and the folder relative paths
            (the cache, runs/latest.json) are relative to.
        eval_options: EvalConfig fields taken from the run's options.
        cost: relative training work, to balance runs over devices.
    """

    index: int
    total: int
    name: str
    shot: int
    seed: int
    head: str
    training_free: bool
    train: dict
    requested: dict
    run_dir: str
    episodes_file: str
    workdir: str
    eval_options: dict
    cost: float

    @property
    def tag(self) -> str:
        return f"[{self.index + 1}/{self.total}] {self.name} (K={self.shot}, seed {self.seed})"


def episodes_name(cfg: SweepConfig, shot: int, seed: int) -> str:
    return (f"{cfg.split}-{cfg.way}way-{shot}shot-{cfg.queries}q-{cfg.episodes}ep-"
            f"seed{seed}.json")


def row_keys(spec: SweepSpec, cfg: SweepConfig) -> list[tuple[RunSpec, int]]:
    """(run, K) pairs in table order: K blocks, runs in spec order within each."""
    shots = list(cfg.shots) if cfg.shots else spec.shots
    pairs = [(run, k) for k in shots for run in spec.runs if "shot" not in run.options]
    pairs += [(run, run.options["shot"]) for run in spec.runs if "shot" in run.options]
    return sorted(pairs, key=lambda p: (p[1], spec.runs.index(p[0])))


def plan_runs(spec: SweepSpec, cfg: SweepConfig, cache_path: str, out: Path) -> list[RunPlan]:
    """Every (row, K, seed) of the sweep as a ``RunPlan``, rows first, seeds inner."""
    keys = row_keys(spec, cfg)
    total = len(keys) * len(cfg.seeds)
    _check_set(spec, cfg.overrides)
    plans = []
    for run, shot in keys:
        options = {"way": cfg.way, **run_options(run, cfg.overrides)}
        options.pop("shot", None)
        head = options.get("head", TrainConfig.head)
        for seed in cfg.seeds:
            plans.append(_plan(run.name, head, options, shot, seed, cfg, cache_path, out,
                               len(plans), total))
    return plans


def _plan(name: str, head: str, options: dict, shot: int, seed: int, cfg: SweepConfig,
          cache_path: str, out: Path, index: int, total: int) -> RunPlan:
    training_free = head_class(head).training_free
    run_dir = (out / "runs" / f"{slug(name)}-{shot}shot-seed{seed}").resolve()
    train_fields = {**options, "cache": _absolute(cache_path), "seed": seed, "shot": shot,
                    "out": str(run_dir)}
    # a training-free head's result depends on its head and the episodes only
    kept = {"head": head} if training_free else options
    requested = {"name": name, "cache": cache_path, "shot": shot, "seed": seed, "options": kept,
                 "test": {"split": cfg.split, "way": cfg.way, "queries": cfg.queries,
                          "episodes": cfg.episodes}}
    return RunPlan(
        index=index, total=total, name=name, shot=shot, seed=seed, head=head,
        training_free=training_free, train=train_fields,
        requested=json.loads(json.dumps(requested)), run_dir=str(run_dir),
        episodes_file=str((out / "episodes" / episodes_name(cfg, shot, seed)).resolve()),
        workdir=os.getcwd(),
        eval_options={k: options[k] for k in EVAL_OPTIONS if k in options},
        cost=0.0 if training_free else _training_cost(train_fields))


def _absolute(path: str) -> str:
    """A local path made absolute for workers wherever they start; URLs (s3://...) as given."""
    return path if "://" in str(path) else str(Path(path).resolve())


def _training_cost(train_fields: dict) -> float:
    """Episodes x videos per episode; unset epochs (the dataset's recipe) count as equal."""
    cfg = TrainConfig(**train_fields)
    return float((cfg.epochs or 1) * cfg.episodes_per_epoch * cfg.way * (cfg.shot + cfg.queries))


def resolve_reference(spec: SweepSpec, cfg: SweepConfig) -> dict[str, str | None]:
    """Row name -> the row it is compared with (None for the reference itself)."""
    names = [r.name for r in spec.runs]
    if cfg.reference is not None and cfg.reference not in names:
        raise UserError(f"--reference {cfg.reference!r} is not a run; runs: {', '.join(names)}")
    reference = cfg.reference or spec.reference or names[0]
    if cfg.reference is not None:
        return {n: (None if n == reference else reference) for n in names}
    return {r.name: (r.vs or (None if r.name == reference else reference)) for r in spec.runs}


# ------------------------------------------------------------------------------ state on disk
def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Flattened ``key: old (on disk) vs new (asked)`` lines of two JSON dicts."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key} {_show(a)} on disk vs {_show(b)} now")
    return lines


_UNSET = object()


def _show(value) -> str:
    return "unset" if value is _UNSET else repr(value)


def run_state(plan: RunPlan) -> str:
    """"done", "resume" or "new"; raises if the directory holds another run."""
    run_dir = Path(plan.run_dir)
    record_path = run_dir / RUN_FILE
    if not record_path.exists():
        if run_dir.exists() and any(e.name != MARKER for e in run_dir.iterdir()):
            raise UserError(f"{run_dir} holds files this sweep did not write; use another --out")
        return "new"
    try:
        record = json.loads(record_path.read_text())
        requested = record["requested"]
        if isinstance(requested.get("options"), dict):  # TA2N's switches before head_options
            requested = {**requested, "options": upgrade_train_payload(requested["options"])}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{record_path} is damaged ({e}); use another --out") from None
    diff = _differences(requested, plan.requested)
    if diff:
        raise UserError(f"{plan.name!r} (K={plan.shot}, seed {plan.seed}) in {run_dir} was run "
                        f"with other options: {'; '.join(diff)}; use another --out (or move "
                        f"that run directory away to redo it)")
    if "result" in record and (run_dir / REPORT_FILE).exists():
        return "done"
    return "resume" if (run_dir / "last.pt").exists() else "new"


def prepare_episodes(plans: list[RunPlan], cache: FeatureCache, cfg: SweepConfig) -> None:
    """Save each seed's and K's test episodes once (the same draw `evaluate` makes), or check
    the saved file is the one this sweep asks for."""
    for path, (shot, seed) in sorted({(p.episodes_file, (p.shot, p.seed)) for p in plans}):
        asked = {"split": cfg.split, "way": cfg.way, "shot": shot, "queries": cfg.queries,
                 "seed": seed}
        if Path(path).exists():
            payload = json.loads(Path(path).read_text())
            found = {k: payload.get(k) for k in asked}
            if found != asked or len(payload.get("episodes", [])) != cfg.episodes:
                raise UserError(f"{path} holds other episodes ({found}); use another --out")
            continue
        sampler = EpisodeSampler(cache, cfg.split, way=cfg.way, shot=shot, queries=cfg.queries,
                                 seed=seed, stream=Stream.TEST)
        save_episodes(path, sampler.episodes(0, cfg.episodes), cache, split=cfg.split,
                      seed=seed)


# ------------------------------------------------------------------------------ one run
def _print(message: str) -> None:
    print(message, flush=True)


def _quiet(message: str) -> None:
    """Training's own messages stay in its run directory's files; the sweep prints per run."""


def execute_run(plan: RunPlan, device: str, threads: int, log: Callable | None = None) -> dict:
    """Train (or resume) and evaluate one run on ``device`` with ``threads`` torch threads;
    write its result into sweep-run.json. Runs in a worker process or in the caller's."""
    log = log or _print
    if os.getcwd() != plan.workdir and os.path.isdir(plan.workdir):
        os.chdir(plan.workdir)  # a reused worker may have started elsewhere: runs/latest.json
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        log(f"{plan.tag} started on {device}")
        torch_device = torch.device(device)
        tick = time.perf_counter()
        summary = _train_run(plan, torch_device)
        if summary is not None and summary["interrupted"]:
            log(f"{plan.tag} interrupted: last.pt saved; rerun the sweep to continue")
            return {"index": plan.index, "interrupted": True}
        train_time = time.perf_counter() - tick
        report = _evaluate_run(plan, torch_device)
        result = {"accuracy": report["accuracy"], "ci95": report["ci95"],
                  "episodes": report["episodes"],
                  "best_val_acc": summary["best_val_acc"] if summary else None,
                  "epochs_done": summary["epochs_done"] if summary else 0,
                  "device": device, "threads": threads,
                  "train_time_s": round(train_time, 3) if summary else 0.0,
                  "eval_time_s": report["wall_time_s"], **to_best(summary)}
        write_json(Path(plan.run_dir) / RUN_FILE, {"requested": plan.requested, "result": result})
        trained = (f"trained {result['epochs_done']} epochs in {train_time:.1f} s, "
                   if summary else "no training, ")
        log(f"{plan.tag} test {report['accuracy']:.2f} +- {report['ci95']:.2f} ({trained}"
            f"evaluated in {report['wall_time_s']:.1f} s)")
        return {"index": plan.index, "interrupted": False, **result}
    finally:
        torch.set_num_threads(previous)


def to_best(summary: dict | None) -> dict:
    """How long a run trained to the checkpoint it is tested with (best.pt): its epoch (the
    first of the best validation accuracy; without validation the last), the training
    episodes before it, and the training seconds of those epochs (validation not counted).
    All None for a training-free head."""
    if summary is None or not summary["history"]:
        return {"best_epoch": None, "episodes_to_best": None, "train_s_to_best": None}
    history = summary["history"]
    validated = [row for row in history if row["val_acc"] is not None]
    best = (max(validated, key=lambda row: row["val_acc"]) if validated else history[-1])["epoch"]
    seconds = sum(row["epoch_time_s"] for row in history if row["epoch"] <= best)
    return {"best_epoch": best,
            "episodes_to_best": best * summary["config"]["episodes_per_epoch"],
            "train_s_to_best": round(seconds, 3)}


def execute_queue(plans: list[RunPlan], device: str, threads: int) -> list[dict]:
    """A worker pinned to one device: its runs one after another (stops if interrupted)."""
    results = []
    for plan in plans:
        results.append(execute_run(plan, device, threads))
        if results[-1]["interrupted"]:
            break
    return results


def _train_run(plan: RunPlan, device: torch.device) -> dict | None:
    """train-heads for a run (resumed from last.pt when there is one); None: training-free."""
    if plan.training_free:
        return None
    run_dir = Path(plan.run_dir)
    if (run_dir / "last.pt").exists():
        return train(None, device=device, resume=str(run_dir), log=_quiet, progress=False)
    return train(TrainConfig(**plan.train), device=device, log=_quiet, progress=False)


def _evaluate_run(plan: RunPlan, device: torch.device) -> dict:
    """evaluate on the sweep's saved episodes; the report lands in the run directory."""
    run_dir = Path(plan.run_dir)
    cache_path = plan.train["cache"]
    checkpoint = None if plan.training_free else str(run_dir / "best.pt")
    with FeatureCache.open(cache_path) as cache:
        source = HeadSource(checkpoint=checkpoint, kind=plan.head, cache=cache_path,
                            shot=plan.shot)
        head, facts = load_head_source(source, cache, seed=plan.seed)
        cfg = EvalConfig(episodes_from=plan.episodes_file, **plan.eval_options)
        return evaluate(head, cache, cfg, device=device, head_config=asdict(head.config),
                        checkpoint=checkpoint, checkpoint_config=facts,
                        report=str(run_dir / REPORT_FILE), progress=False)


# ------------------------------------------------------------------------------ dispatch
def balance(plans: list[RunPlan], workers: int) -> list[list[RunPlan]]:
    """Runs over ``workers`` queues, the costliest first onto the least loaded queue (LPT);
    each queue then runs in sweep order."""
    queues: list[list[RunPlan]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for plan in sorted(plans, key=lambda p: (-p.cost, p.index)):
        i = loads.index(min(loads))
        queues[i].append(plan)
        loads[i] += plan.cost + 1.0  # + 1: an evaluation costs something too
    return [sorted(q, key=lambda p: p.index) for q in queues]


def dispatch(plans: list[RunPlan], cfg: SweepConfig, log: Callable) -> list[dict]:
    """Run ``plans``: in this process, over ``jobs`` processes of one device, or one process
    per device; returns their results (in completion order)."""
    if not plans:
        return []
    if cfg.scheduler is not None:
        from align.cluster import run_on_cluster

        return run_on_cluster(plans, cfg, log)
    devices = list(cfg.devices)
    if len(devices) == 1 and cfg.jobs == 1:
        results = []
        for plan in plans:
            results.append(execute_run(plan, devices[0], cfg.threads, log))
            if results[-1]["interrupted"]:
                break
        return results
    if len(devices) > 1:
        queues = balance(plans, len(devices))
        tasks = [delayed(execute_queue)(q, d, cfg.threads) for d, q in zip(devices, queues) if q]
        workers = len(devices)
    else:
        tasks = [delayed(execute_run)(p, devices[0], cfg.threads) for p in plans]
        workers = cfg.jobs
    results = []
    parallel = Parallel(n_jobs=workers, backend=cfg.backend, return_as="generator_unordered")
    for out in parallel(tasks):
        results.extend(out if isinstance(out, list) else [out])
    return results


def describe_workers(cfg: SweepConfig) -> str:
    if cfg.scheduler is not None:
        return f"the Dask cluster {cfg.scheduler} ({cfg.devices[0]} on each worker)"
    if len(cfg.devices) > 1:
        return f"one {cfg.backend} process per device ({', '.join(cfg.devices)})"
    if cfg.jobs > 1:
        return f"{cfg.jobs} {cfg.backend} processes on {cfg.devices[0]}"
    return f"this process on {cfg.devices[0]}"


# ------------------------------------------------------------------------------ the sweep
def run_sweep(spec: SweepSpec, cfg: SweepConfig, *, log: Callable = print,
              draw: Callable[[dict, Path], None] | None = None) -> dict:
    """Run (or continue) a sweep and write sweep.csv, sweep.md, sweep.json (and the figure
    ``draw(summary, path)`` makes). Returns the summary (``interrupted`` if a run was)."""
    start = time.perf_counter()
    _check_config(cfg)
    references = resolve_reference(spec, cfg)
    cache_path = resolve_cache(cfg.cache, log)
    with FeatureCache.open(cache_path) as cache:
        out = Path(cfg.out or RUNS_ROOT / f"sweep-{slug(spec.title)}-"
                   f"{Path(str(cache_path).rstrip('/')).stem}")
        claim_folder(out, "sweep", "--out", legacy=_made_before_markers)  # never a user's
        plans = plan_runs(spec, cfg, cache_path, out)
        check_references(plans, references)
        states = [run_state(p) for p in plans]  # refuses changed runs before anything runs
        prepare_episodes(plans, cache, cfg)
    todo = [p for p, s in zip(plans, states) if s != "done"]
    for plan, state in zip(plans, states):
        if state == "new":
            claim_folder(plan.run_dir, "train-heads")  # the sweep makes it for its run
            write_json(Path(plan.run_dir) / RUN_FILE, {"requested": plan.requested})
    log(f"sweep  {spec.title}: {len(plans) // len(cfg.seeds)} rows x {len(cfg.seeds)} seeds = "
        f"{len(plans)} runs in {out}; {states.count('done')} done, {states.count('resume')} "
        f"to resume, {states.count('new')} to run, on {describe_workers(cfg)}")
    results = dispatch(todo, cfg, log)
    if any(r["interrupted"] for r in results) or len(results) < len(todo):
        return {"interrupted": True, "out": str(out)}
    summary = summarise(spec, cfg, plans, references, out, cache_path)
    summary["wall_time_s"] = round(time.perf_counter() - start, 1)
    return write_outputs(summary, out, draw)


def _made_before_markers(out: Path) -> bool:
    """A sweep folder from before folder markers: its runs hold this sweep's records."""
    return any(out.glob(f"runs/*/{RUN_FILE}"))


def check_references(plans: list[RunPlan], references: dict[str, str | None]) -> None:
    """Every compared row has its reference at the same K (the same episodes)."""
    keys = {(p.name, p.shot) for p in plans}
    for name, shot in sorted(keys, key=lambda k: (k[1], k[0])):
        vs = references[name]
        if vs is not None and (vs, shot) not in keys:
            raise UserError(f"run {name!r} (K={shot}) is compared with {vs!r}, which has no "
                            f"K={shot} run (paired tests need the same episodes)")


def _check_config(cfg: SweepConfig) -> None:
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise UserError(f"--seeds must name distinct seeds, got {list(cfg.seeds)}")
    if cfg.shots is not None and (not cfg.shots or min(cfg.shots) < 1):
        raise UserError(f"--shots must be positive integers, got {list(cfg.shots)}")
    if cfg.episodes < 2:
        raise UserError("--episodes must be at least 2 (a paired test needs pairs)")
    if cfg.jobs < 1 or cfg.threads < 1:
        raise UserError("--jobs and --threads must be at least 1")
    if cfg.scheduler is not None:
        from align.cluster import check_cluster_config

        check_cluster_config(cfg)
    if cfg.jobs > 1 and len(cfg.devices) > 1:
        raise UserError("give --jobs (processes on one device) or several --devices (one "
                        "process each), not both")


# ------------------------------------------------------------------------------ statistics
def load_run(plan: RunPlan) -> tuple[dict, dict]:
    """(the run's sweep record result, its evaluation report)."""
    run_dir = Path(plan.run_dir)
    record = json.loads((run_dir / RUN_FILE).read_text())
    report = json.loads((run_dir / REPORT_FILE).read_text())
    return record["result"], report


def summarise(spec: SweepSpec, cfg: SweepConfig, plans: list[RunPlan],
              references: dict[str, str | None], out: Path, cache_path: str) -> dict:
    """Per run (the CSV lines) and per row: per-seed accuracy +- CI, mean +- std over seeds,
    and the paired tests against the row's reference (over episodes, over seeds)."""
    runs, episodes = [], {}
    for plan in plans:
        result, report = load_run(plan)
        runs.append(_csv_line(plan, result, out))
        key = (plan.name, plan.shot)
        episodes.setdefault(key, []).append(np.asarray(report["episode_accuracy"]))  # (E,)
    rows = []
    for run, shot in row_keys(spec, cfg):
        lines = [r for r in runs if (r["run"], r["shot"]) == (run.name, shot)]
        mean, std = seed_spread([r["accuracy"] for r in lines])
        vs = references[run.name]
        rows.append({"run": run.name, "shot": shot, "head": lines[0]["head"],
                     "seeds": [{"seed": r["seed"], "accuracy": r["accuracy"], "ci95": r["ci95"]}
                               for r in lines],
                     "mean": mean, "std": std, "vs": vs,
                     "paired": _paired(episodes, (run.name, shot), vs),
                     **{key: _mean_over_seeds(lines, key)
                        for key in ("episodes_to_best", "train_s_to_best")}})
    return {"title": spec.title, "cache": cache_path, "out": str(out),
            "test": {"split": cfg.split, "way": cfg.way, "queries": cfg.queries,
                     "episodes": cfg.episodes, "seeds": list(cfg.seeds)},
            "statistics": {"episodes": PAIRED_EPISODES, "seeds": PAIRED_SEEDS},
            "shared_options": shared_options(plans), "rows": rows, "runs": runs,
            "interrupted": False}


def _mean_over_seeds(lines: list[dict], key: str) -> float | None:
    """The seeds' mean of a to-best figure; None for training-free rows (and for runs recorded
    before sweeps kept it)."""
    values = [line[key] for line in lines if line.get(key) is not None]
    return float(np.mean(values)) if values and len(values) == len(lines) else None


def _paired(episodes: dict, key: tuple[str, int], vs: str | None) -> dict | None:
    """B = the row, A = its reference at the same K, seeds in the same order on both sides:
    over all seeds' episodes pooled, and over the per-seed accuracies (two seeds or more)."""
    if vs is None:
        return None
    a, b = episodes[(vs, key[1])], episodes[key]  # S arrays of (E,)
    by_seed = None
    if len(a) > 1:
        by_seed = paired_test([x.mean() for x in a], [x.mean() for x in b])  # S pairs
    return {"episodes": paired_test(np.concatenate(a), np.concatenate(b)),  # S * E pairs
            "seeds": by_seed}


def shared_options(plans: list[RunPlan]) -> dict:
    """The options every trained run shares (the training budget the table was made with)."""
    trained = [p.requested["options"] for p in plans if not p.training_free]
    if not trained:
        return {}
    shared = dict(trained[0])
    for options in trained[1:]:
        shared = {k: v for k, v in shared.items() if options.get(k, object()) == v}
    return shared


def _csv_line(plan: RunPlan, result: dict, out: Path) -> dict:
    return {"run": plan.name, "shot": plan.shot, "seed": plan.seed, "head": plan.head,
            "options": json.dumps(plan.requested["options"], sort_keys=True),
            "accuracy": round(result["accuracy"], 4), "ci95": round(result["ci95"], 4),
            "episodes": result["episodes"],
            "best_val_acc": (None if result["best_val_acc"] is None
                             else round(result["best_val_acc"], 4)),
            "epochs_done": result["epochs_done"],
            "episodes_file": os.path.relpath(plan.episodes_file, out.resolve()),
            "run_dir": os.path.relpath(plan.run_dir, out.resolve()),
            "device": result["device"], "train_time_s": result["train_time_s"],
            "eval_time_s": result["eval_time_s"],
            **{key: result.get(key) for key in ("best_epoch", "episodes_to_best",
                                                "train_s_to_best")}}


# ------------------------------------------------------------------------------ outputs
def write_outputs(summary: dict, out: Path, draw: Callable | None) -> dict:
    """sweep.csv, sweep.md, the figure (when ``draw`` is given), then sweep.json naming them."""
    files = {"csv": out / "sweep.csv", "markdown": out / "sweep.md", "json": out / "sweep.json"}
    if draw is not None:
        files["figure"] = out / "sweep.png"
    summary["files"] = {k: str(v) for k, v in files.items()}
    with atomic_path(files["csv"]) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(summary["runs"])
    write_text(files["markdown"], format_markdown(summary))
    if draw is not None:
        draw(summary, files["figure"])
    write_json(files["json"], summary)
    return summary


def _cell(mean: float, spread: float | None) -> str:
    return f"{mean:.2f}" + ("" if spread is None else f" +- {spread:.2f}")


def format_markdown(summary: dict) -> str:
    """The paper-style table: a line per row (a K column when there are several K)."""
    test, rows = summary["test"], summary["rows"]
    seeds = test["seeds"]
    several_k = len({r["shot"] for r in rows}) > 1
    best = {k: max(r["mean"] for r in rows if r["shot"] == k) for k in {r["shot"] for r in rows}}
    head = (["run"] + (["K"] if several_k else []) + [f"seed {s}" for s in seeds]
            + ["mean +- std" if len(seeds) > 1 else "mean", "vs", "gain [95% CI]",
               "p (episodes)", "p (seeds)", "episodes to best", "train s to best"])
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for r in rows:
        mean = _cell(r["mean"], r["std"])
        mean = f"**{mean}**" if r["mean"] == best[r["shot"]] else mean
        compare = ["", "(reference)", "", ""] if r["paired"] is None else _comparison(r)
        cells = ([r["run"].replace("|", "\\|")] + ([str(r["shot"])] if several_k else [])
                 + [_cell(s["accuracy"], s["ci95"]) for s in r["seeds"]] + [mean] + compare
                 + _to_best_cells(r))
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join([_caption(summary), "", *lines, ""])


def _to_best_cells(row: dict) -> list[str]:
    """Training episodes and seconds to the tested checkpoint (seeds' mean; blank: no
    training)."""
    episodes, seconds = row.get("episodes_to_best"), row.get("train_s_to_best")
    return ["" if episodes is None else f"{episodes:.0f}",
            "" if seconds is None else f"{seconds:.0f}"]


def _comparison(row: dict) -> list[str]:
    """vs, gain [CI], p over episodes, p over seeds (blank with one seed)."""
    p, by_seed = row["paired"]["episodes"], row["paired"]["seeds"]
    return [row["vs"].replace("|", "\\|"),
            f"{p['gain']:+.2f} [{p['ci_low']:+.2f}, {p['ci_high']:+.2f}]", format_p(p["p"]),
            "" if by_seed is None else format_p(by_seed["p"])]


def _caption(summary: dict) -> str:
    test = summary["test"]
    shots = sorted({r["shot"] for r in summary["rows"]})
    budget = ", ".join(f"{k}={v}" for k, v in sorted(summary["shared_options"].items())
                       if k not in ("head", "head_options"))
    return (f"Sweep `{summary['title']}` on `{summary['cache']}`: {test['way']}-way "
            f"{'/'.join(map(str, shots))}-shot {test['split']} accuracy (%), every run scored "
            f"on the same {test['episodes']} saved episodes per seed (Q = {test['queries']}); "
            f"seed columns: mean +- 95% CI over the episodes; mean +- std (sample) over seeds "
            f"{', '.join(map(str, test['seeds']))}; gain: points over the row in 'vs' with its "
            f"95% CI over the pooled episodes; p (episodes): {summary['statistics']['episodes']}"
            f"; p (seeds): {summary['statistics']['seeds']}; episodes / train s to best: the "
            f"training episodes and seconds (validation not counted) before the best.pt each "
            f"run is tested with, seeds' mean."
            + (f" Trained runs: {budget}." if budget else ""))


def format_sweep(summary: dict) -> str:
    """What `sweep` prints at the end: the table and where the files are."""
    if summary["interrupted"]:
        return (f"interrupted: finished runs are kept in {summary['out']}; rerun the same "
                f"command to continue")
    return "\n".join([format_markdown(summary),
                      f"wall time  {summary['wall_time_s']:.1f} s (this invocation)",
                      "wrote      " + ", ".join(summary["files"].values())])
