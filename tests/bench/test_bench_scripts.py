"""Every benchmark still imports what it uses from the library: a rename in align/, cache/ or
extract/ must not leave a bench script that fails only when someone finally runs it."""

import pytest
from bench_testing import BENCH, load_bench_script


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_imports(script):
    module = load_bench_script(script)
    assert callable(getattr(module, "main", None)), f"{script} has no main()"
