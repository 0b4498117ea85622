"""Every generated CLI option says what its config field declares (cache/options.py): one
declaration per option, so --help, the CLI's defaults and the configs cannot drift apart."""

from dataclasses import MISSING, dataclass

import click
import click.testing
import pytest

from align.evaluate import EvalConfig
from align.recipes import TrainConfig
from align.reports.configs import VisualizeConfig
from align.reports.embedding import EmbeddingConfig
from align.reports.misalignment import MisalignmentConfig
from align.sweep import SweepConfig
from cache.errors import UserError
from cache.options import OPTION, Range, declared_fields, option, options_from
from classify.config import ClassifyConfig
from cli import cli
from demo import DemoConfig
from extract.adapt import AdaptConfig
from extract.plan import ExtractConfig
from extract.toydata import ToyConfig

# (command path, its config class): every command whose options are generated from a config
GENERATED = [(("train-heads",), TrainConfig), (("evaluate",), EvalConfig),
             (("analyze", "embedding"), EmbeddingConfig),
             (("analyze", "misalignment"), MisalignmentConfig),
             (("toy-data",), ToyConfig), (("demo",), DemoConfig),
             (("classify",), ClassifyConfig), (("visualize",), VisualizeConfig),
             (("sweep",), SweepConfig), (("extract",), ExtractConfig),
             (("adapt-backbone",), AdaptConfig)]


def command_at(path):
    command = cli
    for name in path:
        command = command.commands[name]
    return command


def disagreements(command: click.Command, config_class) -> list[str]:
    """How the options of ``command`` differ from the declarations of ``config_class``."""
    params = {p.name: p for p in command.params}
    found = []
    for f in declared_fields(config_class):
        declared, param = f.metadata[OPTION], params.get(f.name)
        if param is None:
            found.append(f"{f.name}: no option")
            continue
        default = None if f.default is MISSING else f.default
        if f.default is MISSING and not param.required:
            found.append(f"{f.name}: field has no default, option not required")
        elif f.default is not MISSING and param.default != default:
            found.append(f"{f.name}: option default {param.default!r}, field {default!r}")
        if param.help != declared.help:
            found.append(f"{f.name}: option help {param.help!r}, field {declared.help!r}")
        if declared.flag_of(f.name) not in param.opts:
            found.append(f"{f.name}: flag {param.opts}, declared {declared.flag_of(f.name)}")
        if declared.range is not None:
            kind = param.type
            span = (getattr(kind, "min", "?"), getattr(kind, "max", "?"),
                    getattr(kind, "min_open", "?"), getattr(kind, "max_open", "?"))
            wanted = (declared.range.low, declared.range.high, declared.range.low_open,
                      declared.range.high_open)
            if span != wanted:
                found.append(f"{f.name}: option range {span}, field {wanted}")
        if declared.choices is not None and \
                tuple(getattr(param.type, "choices", ())) != declared.choices_now():
            found.append(f"{f.name}: option choices {getattr(param.type, 'choices', None)}, "
                         f"field {declared.choices_now()}")
    return found


@pytest.mark.parametrize("path, config_class", GENERATED, ids=lambda v: str(v))
def test_every_option_is_its_fields_declaration(path, config_class):
    assert disagreements(command_at(path), config_class) == []


def test_no_option_default_disagrees_with_a_config_field():
    """Hand-written options too: an option named like a field of the command's config has
    the field's default (the K drift: 5 on the command, 1 in the config)."""
    from dataclasses import fields

    for path, config_class in GENERATED:
        defaults = {f.name: f.default for f in fields(config_class) if f.default is not MISSING}
        for param in command_at(path).params:
            if param.name in defaults and param.default is not None:
                assert param.default == defaults[param.name], (path, param.name)


@dataclass
class Toy:
    shot: int = option(5, help="K.", range=Range(1), flag="--shots")
    mode: str = option("a", choices=("a", "b"))


def test_the_check_catches_a_hand_written_option_that_drifted():
    @click.command()
    @click.option("--shots", "shot", type=click.IntRange(min=0), default=1, help="K!")
    @click.option("--mode", type=click.Choice(["a", "c"]), default="a")
    def drifted(shot, mode):
        pass

    found = disagreements(drifted, Toy)
    assert any("default 1" in f for f in found) and any("help" in f for f in found)
    assert any("range" in f for f in found) and any("choices" in f for f in found)


def test_a_generated_command_parses_into_the_config():
    @click.command()
    @options_from(Toy)
    def toy(**values):
        click.echo(repr(Toy(**values)))

    assert disagreements(toy, Toy) == []
    runner = click.testing.CliRunner()
    assert runner.invoke(toy, []).output.strip() == repr(Toy())
    assert "Toy(shot=3, mode='b')" in runner.invoke(toy, ["--shots", "3", "--mode", "b"]).output
    assert runner.invoke(toy, ["--shots", "0"]).exit_code == 2


def test_extract_and_adapt_share_one_declaration_of_their_common_options():
    """Flag, alias, default, range, choices, path type and check of the options both phase-one
    commands take are the same object's (extract/options.py); only the help may differ."""
    extract = {f.name: f for f in declared_fields(ExtractConfig)}
    adapt = {f.name: f for f in declared_fields(AdaptConfig)}
    shared = sorted(set(extract) & set(adapt))
    assert {"dataset", "root", "split_dir", "limit", "backbone", "weights", "frames",
            "image_size", "resize", "seed", "workers", "timeout"} <= set(shared)
    for name in shared:
        mine, theirs = extract[name].metadata[OPTION], adapt[name].metadata[OPTION]
        for aspect in ("range", "choices", "flag", "aliases", "kind", "path", "check"):
            assert getattr(mine, aspect) == getattr(theirs, aspect), (name, aspect)
        assert extract[name].default == adapt[name].default, name


def refuse_b(value):
    if value == "b":
        raise UserError("b is not allowed here")


@dataclass
class Checked:
    name: str = option(MISSING, help="Required.")
    where: str = option(None, path="dir")
    mode: str = option("a", check=refuse_b)


def test_required_path_and_check_declarations_are_enforced_while_parsing(tmp_path):
    @click.command()
    @options_from(Checked)
    def checked(**values):
        click.echo(repr(Checked(**values)))

    runner = click.testing.CliRunner()
    assert "Missing option '--name'" in runner.invoke(checked, []).output
    refused = runner.invoke(checked, ["--name", "x", "--mode", "b"])
    assert refused.exit_code == 2 and "b is not allowed here" in refused.output
    missing = runner.invoke(checked, ["--name", "x", "--where", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    fine = runner.invoke(checked, ["--name", "x", "--where", str(tmp_path)])
    assert fine.exit_code == 0 and f"where={str(tmp_path)!r}" in fine.output


def test_extract_refuses_an_unknown_backbone_in_one_line():
    result = click.testing.CliRunner().invoke(
        cli, ["extract", "--dataset", "ucf101", "--backbone", "resnet7"])
    assert result.exit_code == 2 and "--backbone" in result.output


def test_a_range_is_listed_as_it_is_checked():
    """``cli.py heads`` lists a head option's range in these words."""
    assert Range(1).describe() == ">= 1" and Range(0, low_open=True).describe() == "> 0"
    assert Range(high=1).describe() == "<= 1"
    assert Range(0, 1, high_open=True).describe() == "in [0, 1)"
    assert Range(0, low_open=True).refusal("--x", 0) == "--x must be in (0, inf], not 0"
