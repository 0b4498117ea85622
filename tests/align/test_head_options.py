"""Heads own their options: each head's ``OPTIONS`` declaration is what train-heads
(``--head-option``), sweep files, ``cli.py heads`` and checkpoints read; the declaration matches
the constructor; runs and checkpoints written before (TA2N's switches at the top level) still
load and mean the same."""

import inspect
import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

import cli
from align.checkpoints import CHECKPOINT_FORMAT, load_head, load_head_checkpoint
from align.models import (
    HEADS,
    HeadConfig,
    build_head,
    build_head_from_config,
    check_head_options,
    parse_head_options,
)
from align.recipes import TrainConfig
from align.sweep import (
    RUN_FILE,
    RunSpec,
    SweepConfig,
    load_spec,
    parse_assignments,
    plan_runs,
    run_state,
)
from align.train import train
from cache import UserError
from cache.options import Declaration, NamedOption, Range, check_ranges
from cache.torch_files import save_tensors

SIZES = ("self", "channels", "frames", "height", "width", "shot")
QUIET = dict(device=torch.device("cpu"), progress=False, log=lambda message: None)


def one_line(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = info.value.format_message()
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------ declarations
@pytest.mark.parametrize("kind", sorted(HEADS))
def test_declared_options_are_the_constructor_keywords_with_its_defaults(kind):
    cls = HEADS[kind]
    params = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
              if n not in SIZES}
    declared = {o.name: o.default for o in cls.OPTIONS}
    assert set(declared) == set(params), kind
    for name, default in declared.items():
        wanted = list(params[name]) if isinstance(params[name], tuple) else params[name]
        assert default == wanted and type(default) is type(wanted), (kind, name)


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_every_head_builds_from_its_declared_defaults_and_records_them(kind):
    cls = HEADS[kind]
    by_default = build_head(kind, channels=16, frames=4, height=2, width=2)
    declared = build_head(kind, channels=16, frames=4, height=2, width=2,
                          options=cls.default_options())
    assert by_default.config == declared.config
    assert by_default.config.options == cls.default_options()  # every option, recorded
    for a, b in zip(by_default.state_dict().values(), declared.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ parsing
def test_cli_text_is_parsed_by_the_declared_type():
    pairs = parse_head_options(["ttm=no", "tc=1", "sc=False", "sc-mode=grid", "fast=yes"])
    assert check_head_options("ta2n", pairs, parse_text=True) == {
        "ttm": False, "tc": True, "sc": False, "sc_mode": "grid", "fast": True}
    assert check_head_options("trx", {"sets": "1,3", "dim": "64"}, parse_text=True) == {
        "sets": [1, 3], "dim": 64}
    assert check_head_options("arn", {"sigma": "50"}, parse_text=True) == {"sigma": 50.0}


@pytest.mark.parametrize("kind, given, expected", [
    ("trx", {"combin": "mean"}, "trx has no option 'combin'; its options: combine, dim, sets"),
    ("protonet", {"dim": "3"}, "protonet has no option 'dim'; its options: none"),
    ("ta2n", {"sc_mode": "box"}, "ta2n: option 'sc_mode' must be one of mask, grid, enumerate"),
    ("ta2n", {"ttm": "maybe"}, "ta2n: option 'ttm' must be true or false, got 'maybe'"),
    ("arn", {"dim": "8"}, "arn: option 'dim' must be in [16, inf], not 8"),  # Range's words
    ("trx", {"sets": "2,0"}, "trx: option 'sets' must be in [1, inf], not 0"),
    ("trx", {"sets": "two"}, "trx: option 'sets' must be integers separated by commas"),
    ("cmn", {"dim": "1.5"}, "cmn: option 'dim' must be an integer, got '1.5'"),
])
def test_bad_cli_values_are_one_line_errors_naming_the_known_ones(kind, given, expected):
    assert expected in one_line(lambda: check_head_options(kind, given, parse_text=True))


def test_json_values_are_checked_by_type_too():
    assert "'tc' must be true or false" in one_line(
        lambda: check_head_options("ta2n", {"tc": "false"}))  # text is not a bool in a file
    assert "expected KEY=VALUE" in one_line(lambda: parse_head_options(["ttm"]))


# ------------------------------------------------------------------------------ sweeps
def test_sweep_set_head_options_reach_the_heads_that_declare_them(tmp_path):
    spec = load_spec("table3")
    cfg = SweepConfig(overrides={"head_options": {"sc_mode": "grid"}})
    plans = plan_runs(spec, cfg, str(tmp_path / "c.zarr"), tmp_path / "out")
    by_name = {p.name: p.train for p in plans}
    assert "head_options" not in by_name["no module (ProtoNet)"]
    assert by_name["TC + SC"]["head_options"] == {"ttm": False, "tc": True, "sc": True,
                                                 "sc_mode": "grid"}
    typo = SweepConfig(overrides={"head_options": {"sc_mod": "grid"}})
    assert "no head of this sweep (protonet, ta2n) has option 'sc_mod'" in one_line(
        lambda: plan_runs(spec, typo, str(tmp_path / "c.zarr"), tmp_path / "out"))


def test_a_sweep_run_recorded_with_the_old_switches_is_the_same_run(tmp_path):
    plans = plan_runs(load_spec("table3"), SweepConfig(), str(tmp_path / "c.zarr"), tmp_path)
    plan = next(p for p in plans if p.name == "TC + SC")
    options = dict(plan.requested["options"])
    old = {**{k: v for k, v in options.items() if k != "head_options"},
           **options["head_options"]}  # {"head": "ta2n", "ttm": False, "tc": True, ...}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_FILE).write_text(json.dumps({"requested": {**plan.requested,
                                                              "options": old}}))
    assert run_state(replace(plan, run_dir=str(run_dir))) == "new"  # not "other options"


def test_sweep_file_head_options_merge_over_the_defaults(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[defaults]\nhead_options = {sc = false}\n\n[[run]]\nname = "a"\n'
                    'head_options = {ttm = false}\n\n[[run]]\nname = "b"\n')
    runs = load_spec(str(path)).runs
    assert runs == [RunSpec("a", {"head_options": {"sc": False, "ttm": False}}),
                    RunSpec("b", {"head_options": {"sc": False}})]


# ------------------------------------------------------------------------------ the CLI
def test_train_heads_head_option_end_to_end(tmp_path, monkeypatch, make_synth):
    monkeypatch.chdir(tmp_path)
    cache = make_synth(tmp_path / "synth.zarr")
    args = ["train-heads", "--cache", cache, "--out", "run", "--shots", "1", "--queries", "2",
            "--epochs", "1", "--episodes-per-epoch", "2", "--val-episodes", "2",
            "--device", "cpu", "--head-option", "ttm=false", "--head-option", "sc_mode=grid"]
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["head_options"] == {"ttm": False, "sc_mode": "grid"}
    head = load_head(tmp_path / "run" / "last.pt")
    assert head.ttm is None and head.sc.mode == "grid"
    assert head.config.options == {"ttm": False, "tc": True, "sc": True, "sc_mode": "grid",
                                   "fast": True}
    bad = CliRunner().invoke(cli.cli, ["train-heads", "--head", "trx", "--head-option",
                                       "combin=mean"])
    assert bad.exit_code != 0
    assert "trx has no option 'combin'; its options: combine, dim, sets" in bad.output


def test_heads_command_lists_every_head_with_its_defaults():
    out = CliRunner().invoke(cli.cli, ["heads"]).output
    for kind, cls in HEADS.items():
        assert kind in out
        for option in cls.OPTIONS:
            assert option.describe() in out
    assert "combine=mean (str; one of mean|norm)" in out and "sc=true (bool)" in out


# ------------------------------------------------------------------------------ old files
def old_layout_checkpoint(head, path, version=2, **top_level):
    """A checkpoint as the code before version 3 wrote it: TA2N's switches at the top level
    of every head's config, the head's own options in "options" (literal dict, not asdict)."""
    config = {"kind": head.kind, "channels": head.channels, "frames": head.frames,
              "height": head.height, "width": head.width, "shot": head.shot, **top_level}
    save_tensors({"format": CHECKPOINT_FORMAT, "version": version, "config": config,
                  "state_dict": head.state_dict(), "extra": {}}, path)


def test_version_2_ta2n_checkpoint_with_sc_off_loads_as_it_was_trained(tmp_path):
    head = build_head("ta2n", channels=8, frames=4, height=4, width=4, sc=False, seed=2)
    old_layout_checkpoint(head, tmp_path / "old.pt", ttm=True, tc=True, sc=False,
                          sc_mode="mask", fast=True, options={})
    loaded = load_head(tmp_path / "old.pt")
    assert loaded.sc is None and loaded.ttm is not None
    assert loaded.config == head.config
    support, query = torch.randn(2, 8, 4, 4, 4), torch.randn(3, 8, 4, 4, 4)
    torch.testing.assert_close(loaded(support, query, 2, 1), head.eval()(support, query, 2, 1))


def test_version_2_trx_checkpoint_drops_the_switches_and_keeps_its_options(tmp_path):
    head = build_head("trx", channels=8, frames=4, height=3, width=3, sets=[2], dim=16)
    old_layout_checkpoint(head, tmp_path / "old.pt", ttm=False, tc=False, sc=False,
                          sc_mode="mask", fast=True,
                          options={"dim": 16, "sets": [2], "combine": "mean"})
    assert load_head(tmp_path / "old.pt").config == head.config
    # version 1 (no "combine" recorded): the L2 norm of the first release, as before
    old_layout_checkpoint(head, tmp_path / "v1.pt", version=1, ttm=False, tc=False, sc=False,
                          sc_mode="mask", fast=True, options={"dim": 16, "sets": [2]})
    assert load_head(tmp_path / "v1.pt").config.options["combine"] == "norm"


def test_a_run_written_before_head_options_resumes(tmp_path, make_synth):
    cache = make_synth(tmp_path / "synth.zarr")
    run = tmp_path / "run"
    cfg = TrainConfig(cache=cache, out=str(run), head_options={"sc": False}, shot=1, queries=2,
                      epochs=1, episodes_per_epoch=2, val_episodes=2)
    train(cfg, **QUIET)
    # rewrite last.pt, config.json as the code before head_options wrote them
    ckpt = torch.load(run / "last.pt", weights_only=True)
    head_cfg = ckpt["config"]
    switches = head_cfg.pop("options")
    ckpt["config"], ckpt["version"] = {**head_cfg, **switches, "options": {}}, 2
    for section in [ckpt["extra"]["config"]]:
        section.pop("head_options")
        section.update(ttm=True, tc=True, sc=False, sc_mode="mask")
    save_tensors(ckpt, run / "last.pt")
    saved = json.loads((run / "config.json").read_text())
    for key in ("train", "requested"):
        saved[key].pop("head_options")
        saved[key].update(ttm=True, tc=True, sc=False, sc_mode="mask")
    saved["head"] = ckpt["config"]
    (run / "config.json").write_text(json.dumps(saved))
    head, state = load_head_checkpoint(run / "last.pt")
    assert head.sc is None and TrainConfig.from_json(state["config"]).head_options == {
        "ttm": True, "tc": True, "sc": False, "sc_mode": "mask"}
    resumed = train(None, resume=str(run), **QUIET)  # config.json and last.pt still agree
    assert resumed["epochs_done"] == 1


# ------------------------------------------------------------------------------ one declaration
REFUSED = [  # (head, option, as --head-option text, as a JSON value, the refusal)
    ("arn", "dim", "8", 8, "arn: option 'dim' must be in [16, inf], not 8"),
    ("trn", "tuples", "-1", -1, "trn: option 'tuples' must be in [0, inf], not -1"),
    ("trx", "sets", "2,0", [2, 0], "trx: option 'sets' must be in [1, inf], not 0"),
    ("ta2n", "sc_mode", "box", "box",
     "ta2n: option 'sc_mode' must be one of mask, grid, enumerate"),
]


def refusals_at_every_entry_point(tmp_path, kind, name, text, value) -> dict:
    """The one-line error each way of giving a head option produces for the same bad value."""
    found = {}
    cli_run = CliRunner().invoke(cli.cli, ["train-heads", "--head", kind, "--head-option",
                                           f"{name}={text}"])
    assert cli_run.exit_code != 0
    found["--head-option"] = cli_run.output.strip().splitlines()[-1]
    sweep_file = tmp_path / "s.toml"
    sweep_file.write_text(f'[[run]]\nname = "a"\nhead = "{kind}"\n'
                          f'head_options = {{{name} = {json.dumps(value)}}}\n')
    found["sweep file"] = one_line(lambda: load_spec(str(sweep_file)))
    sweep_file.write_text(f'[[run]]\nname = "a"\nhead = "{kind}"\n')
    overrides = parse_assignments([f"head_options.{name}={json.dumps(value)}"])
    found["--set"] = one_line(lambda: plan_runs(load_spec(str(sweep_file)),
                                                SweepConfig(overrides=overrides),
                                                str(tmp_path / "c.zarr"), tmp_path / "out"))
    config = HeadConfig(kind=kind, channels=8, frames=4, height=4, width=4,
                        options={name: value})
    found["HeadConfig"] = one_line(lambda: build_head_from_config(config))
    return found


@pytest.mark.parametrize("kind, name, text, value, refusal", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_declared_range_or_choice_is_enforced_alike_at_every_entry_point(
        tmp_path, kind, name, text, value, refusal):
    found = refusals_at_every_entry_point(tmp_path, kind, name, text, value)
    for where, message in found.items():  # each may only say where first ("s.toml: run 'a': ")
        assert message.endswith(refusal), (where, message)


def test_a_head_option_and_a_command_option_of_the_same_range_are_refused_alike():
    """TrainConfig's --shots and TRN's dim are both declared Range(1): past the option's name,
    the same words; so are a choice of each."""
    command = one_line(lambda: check_ranges(TrainConfig, {"shot": 0}))
    head = one_line(lambda: check_head_options("trn", {"dim": 0}))
    assert command == "--shots must be in [1, inf], not 0"
    assert head.removeprefix("trn: option 'dim'") == command.removeprefix("--shots")
    command = one_line(lambda: check_ranges(TrainConfig, {"optimizer": "lbfgs"}))
    head = one_line(lambda: check_head_options("trx", {"combine": "max"}))
    assert command.removeprefix("--optimizer").startswith(" must be one of ")
    assert head == "trx: option 'combine' must be one of mean, norm"


def test_head_options_are_cache_options_declarations():
    for kind, cls in HEADS.items():
        for declared in cls.OPTIONS:
            assert isinstance(declared, NamedOption), (kind, declared)
            assert isinstance(declared.declared, Declaration), (kind, declared.name)
    dim = next(o for o in HEADS["arn"].OPTIONS if o.name == "dim")
    assert dim.declared.range == Range(16)
    assert dim.describe() == ("dim=64 (int; >= 16): the encoder's width and the side of the "
                              "pooled matrices")
