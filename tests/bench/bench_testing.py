"""Loading a bench script as a module (bench/ is scripts, not a package)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench_script(name: str):
    """The module of bench/<name> with its top level run (main() runs only under __main__)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name.removesuffix('.py')}",
                                                  BENCH / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
