"""Shared by the tests/extract/test_extract_reliability_*.py modules: run `cli.py extract` on
the tiny dataset (see conftest.tiny_dataset) in this process, from a given working directory."""

import os
import shutil
from pathlib import Path

from click.testing import CliRunner
from extract_testing import TINY

from cli import cli


def run_cli(args, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def extract(root, split_dir, out, weights, cwd, *extra):
    """`cli.py extract` of the tiny dataset into ``out``."""
    return run_cli(["extract", "--dataset", "custom", "--root", root, "--split-dir", split_dir,
                    "--out", out, "--weights", weights, *TINY, *extra], cwd)


def copy_of(cache: Path, tmp_path: Path) -> Path:
    """A private copy of a module-wide extracted cache, to damage."""
    target = tmp_path / cache.name
    if cache.is_dir():
        shutil.copytree(cache, target)
    else:
        shutil.copy(cache, target)
    return target


def one_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    return result.output
