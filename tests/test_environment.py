"""The project's one list of pins (pyproject.toml) and its mirrors stay in step."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Extras for hardware a CPU machine lacks: neither the conda environment nor `make test` installs
# them (the `gpu` extra's NVDEC decoder is faked in tests/extract/test_gpu_decode.py).
HARDWARE_EXTRAS = {"gpu"}


def extras() -> dict[str, list[str]]:
    """The optional extras a CPU machine installs (all but HARDWARE_EXTRAS)."""
    every = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert HARDWARE_EXTRAS <= set(every)
    return {name: pins for name, pins in every.items() if name not in HARDWARE_EXTRAS}


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
