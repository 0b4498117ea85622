"""Every `python cli.py ...` command the README and docs/own-videos.md show parses against the
real CLI.

The demo runs the demo's commands for real (tests/test_demo.py); this test keeps every other
command line in the README from naming a command, option or choice that no longer exists.
"""

import re
import shlex
from pathlib import Path

import click
import pytest

import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
OWN_VIDEOS = (ROOT / "docs" / "own-videos.md").read_text()


def readme_commands(text: str = README) -> list[str]:
    commands = []
    for line in text.splitlines():
        for match in re.finditer(r"python cli\.py ([^`|&\\\n]+)", line):
            commands.append(match.group(1).strip())
    return commands


def parse(args: list[str]) -> None:
    group_ctx = cli.cli.make_context("cli", list(args), resilient_parsing=True)
    name, command, rest = cli.cli.resolve_command(group_ctx, list(args))
    if isinstance(command, click.Group):
        sub_ctx = command.make_context(name, list(rest), resilient_parsing=True)
        name, command, rest = command.resolve_command(sub_ctx, list(rest))
    try:
        command.make_context(name, list(rest))
    except click.BadParameter as error:
        # paths that exist only on a user's machine are fine; unknown options/choices are not
        if "does not exist" not in str(error):
            raise


def test_readme_shows_the_main_commands():
    commands = readme_commands()
    for name in ("extract", "train-heads", "evaluate", "info", "visualize", "analyze", "synth"):
        assert any(c.split()[0] == name for c in commands), name


def test_own_videos_page_shows_its_commands():
    commands = readme_commands(OWN_VIDEOS)
    for name in ("classify", "extract", "train-heads", "evaluate", "adapt-backbone"):
        assert any(c.split()[0] == name for c in commands), name
    assert "docs/own-videos.md" in README


@pytest.mark.parametrize("command", readme_commands() + readme_commands(OWN_VIDEOS))
def test_readme_command_parses(command):
    args = shlex.split(command.split("#")[0])
    # placeholders like CACHE, [CACHE] or REPORT_A stand for the user's own values
    args = ["x" if re.fullmatch(r"\[?[A-Z_]+\]?", a) else a.strip("[]") for a in args]
    args = [a for a in args if a and "|" not in a and not a.startswith("$")]
    if len(args) == 1:  # a bare mention in prose, e.g. "`python cli.py extract`"
        assert args[0] in cli.cli.commands
        return
    parse(args)
