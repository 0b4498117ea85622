"""The project's one list of pins (pyproject.toml) and its mirrors stay in step."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def pyproject_pins() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]).union(*extras().values())


def conda_pins() -> tuple[str, set[str]]:
    text = (ROOT / "environment.yml").read_text()
    python = re.search(r"^\s*- python=(\S+)", text, re.M).group(1)
    pip_block = text.split("- pip:", 1)[1]
    return python, {m.group(1) for m in re.finditer(r"^\s+- (\S+)\s*$", pip_block, re.M)}


def test_environment_yml_agrees_with_pyproject():
    python, pins = conda_pins()
    assert python == "3.11"
    assert pins == pyproject_pins()


def test_make_test_installs_every_extra():
    """CI runs `make test`: the tests of an optional extra (the Dask cluster's) run there."""
    makefile = (ROOT / "Makefile").read_text()
    install = re.search(r'pip install --quiet -e "\.\[([a-z,]+)\]"', makefile)
    assert install and set(install.group(1).split(",")) == set(extras())


def test_torch_pins_are_the_local_wheel_versions():
    pins = pyproject_pins()
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins


def test_ci_runs_exactly_the_readme_test_command():
    assert "make test" in (ROOT / "README.md").read_text()
    commands = [line for line in (ROOT / ".ci/run").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert commands[-1].strip() == "make test"
