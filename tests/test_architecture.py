"""The package layering docs/architecture.md promises, checked on every import statement
(lazy imports inside functions included): imports only go down

    cli -> demo -> classify -> align.reports -> align engine -> align.models -> cache

and phase two touches phase one only through extract's one public frame reader (classify, which
runs both phases on a person's clips, sits above them and may import either)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ("align.checkpoints", "align.episodes", "align.feed", "align.runs", "align.recipes",
          "align.run_open", "align.train", "align.evaluate", "align.stats", "align.sweep",
          "align.options", "align.cluster")
LAYERS = [  # (module prefixes, rank): a module may import its own rank or lower
    (("cache",), 0),
    (("extract",), 1),
    (("align.models",), 2),
    (ENGINE, 3),
    (("align.reports",), 4),
    (("classify",), 5),
    (("demo",), 6),
    (("cli",), 7),
]
PHASE_ONE_API = "extract.frames"  # what phase two may import from extract


def rank(module: str) -> int | None:
    for prefixes, r in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return r
    return None


def project_modules():
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("[ace]*/**/*.py")):
        if ".venv" in path.parts:
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if rank(name) is not None:
            yield name, path


def imports_of(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_imports_only_go_down():
    wrong = []
    for name, path in project_modules():
        for target in imports_of(path):
            r = rank(target)
            if r is None:
                continue  # a library
            if r > rank(name):
                wrong.append(f"{name} imports {target}")
            if name.startswith("align") and target.startswith("extract") \
                    and target != PHASE_ONE_API:
                wrong.append(f"{name} imports {target} (phase two sees {PHASE_ONE_API} only)")
            if name.startswith("extract") and target.startswith(("align", "demo", "cli")):
                wrong.append(f"{name} imports {target} (phase one never imports phase two)")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_every_package():
    names = {name for name, _ in project_modules()}
    for expected in ("cache.store", "extract.frames", "align.models.ta2n", "align.runs",
                     "align.sweep", "align.reports.pairs", "classify.api", "demo", "cli"):
        assert expected in names


def test_demo_reaches_cli_only_as_a_program():
    """demo.py runs the commands of both phases as a user types them - `python cli.py ARGS` in a
    subprocess, or through the runner `python cli.py demo` hands it - and never imports cli: a
    fresh interpreter imports demo without loading cli. cli imports demo's DemoConfig at module
    level (the demo command's options are declared from it) and the demo's runner only inside
    the demo command, so `python cli.py --help` does not depend on how the demo runs."""
    assert not [t for t in imports_of(ROOT / "demo.py") if t == "cli" or t.startswith("cli.")]
    loaded = subprocess.run([sys.executable, "-c", "import sys, demo; print('cli' in sys.modules)"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "False"
    module_level = [[alias.name for alias in node.names]
                    for node in ast.parse((ROOT / "cli.py").read_text()).body
                    if isinstance(node, ast.ImportFrom) and node.module == "demo"]
    assert module_level == [["DemoConfig"]]
