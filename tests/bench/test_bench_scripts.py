"""Every benchmark still imports what it uses from the library: a rename in align/, cache/ or
extract/ must not leave a bench script that fails only when someone finally runs it."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_imports(script):
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # top level only: main() runs under __main__
    assert callable(getattr(module, "main", None)), f"{script} has no main()"
