"""bench/recipes.py continues a study instead of starting it over: which earlier run a longer
one may continue (same candidate and seed, a budget-independent schedule, a last.pt to resume
from), and that the continued copy asks for the longer budget."""

import json
from pathlib import Path

from bench_testing import load_bench_script


def load_recipes():
    return load_bench_script("recipes.py")


def make_run(study: Path, name: str, schedule: str, epochs: int, last: bool = True) -> Path:
    run = study / name
    run.mkdir(parents=True)
    config = {"epochs": epochs, "schedule": schedule, "out": str(run)}
    (run / "config.json").write_text(json.dumps({"requested": dict(config, schedule=None),
                                                 "train": config}))
    (run / "metrics.csv").write_text("epoch\n1\n")
    if last:
        (run / "last.pt").write_bytes(b"weights")
    return run


def test_a_longer_run_continues_the_longest_shorter_one_of_a_budget_free_schedule(tmp_path):
    recipes = load_recipes()
    make_run(tmp_path, "paper-1000ep-s0", "step", 10)
    longest = make_run(tmp_path, "paper-2000ep-s0", "step", 20)
    make_run(tmp_path, "paper-2000ep-s1", "step", 20)  # another seed
    make_run(tmp_path, "paper-lr2-2500ep-s0", "step", 25)  # another candidate, same prefix
    make_run(tmp_path, "paper-4000ep-s0", "step", 40)  # longer than asked
    assert recipes.shorter_run(tmp_path, "paper", 0, 3000) == longest

    make_run(tmp_path, "fast-2000ep-s0", "cosine", 20)  # its lr depends on the budget
    make_run(tmp_path, "adam-1000ep-s0", "constant", 10, last=False)  # nothing to resume
    assert recipes.shorter_run(tmp_path, "fast", 0, 3000) is None
    (make_run(tmp_path, "const-1000ep-s0", "constant", 10) / "config.json").write_text('{"tr')
    assert recipes.shorter_run(tmp_path, "const", 0, 3000) is None  # truncated config: skipped
    assert recipes.shorter_run(tmp_path, "adam", 0, 3000) is None


def test_the_continued_copy_asks_for_the_longer_budget_and_keeps_the_original(tmp_path):
    recipes = load_recipes()
    shorter = make_run(tmp_path, "paper-2000ep-s0", "step", 20)
    (shorter / "curve.json").write_text("{}")  # finished: its curve stops at 2000
    out = tmp_path / "paper-3000ep-s0"
    recipes.extend_run(shorter, out, 3000)
    saved = json.loads((out / "config.json").read_text())
    assert saved["requested"]["epochs"] == saved["train"]["epochs"] == 3000 // 100
    assert saved["train"]["out"] == str(out)
    assert (out / "last.pt").read_bytes() == b"weights" and not (out / "curve.json").exists()
    assert json.loads((shorter / "config.json").read_text())["train"]["epochs"] == 20
    assert (shorter / "curve.json").exists()
