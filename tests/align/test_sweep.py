"""Sweeps end to end on tiny synthetic caches: identical episodes, the statistics, resume,
refusal of changed runs, parallel = serial, and a killed sweep continued."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import align.sweep.runner
import cli
from align.evaluate import EvalConfig, evaluate
from align.models import build_head
from align.reports.sweep import sweep_command
from align.stats import paired_test
from align.sweep import (
    RUN_FILE,
    TIMING_FIELDS,
    SweepConfig,
    format_sweep,
    load_spec,
    run_sweep,
    to_best,
)
from cache import FeatureCache, UserError

ROOT = Path(__file__).resolve().parents[2]
HEADS_FILE = """
title = "free"
reference = "protonet"

[[run]]
name = "protonet"
head = "protonet"

[[run]]
name = "otam"
head = "otam"
"""
# a tiny training budget for table3 (every trained row), as `--set` gives it
BUDGET = {"epochs": 3, "episodes_per_epoch": 6, "val_episodes": 2, "queries": 2,
          "tasks_per_batch": 3}


def quiet(message):
    """Sweep progress lines are not part of these tests' checks."""


def read_csv(path, timings=False):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows if timings else [{k: v for k, v in r.items() if k not in TIMING_FIELDS}
                                 for r in rows]


@pytest.fixture
def free_sweep(tmp_path, monkeypatch, make_synth):
    """A training-free sweep (protonet, otam; 2 seeds) of a tiny cache, and how to rerun it."""
    monkeypatch.chdir(tmp_path)
    cache = make_synth(tmp_path / "tiny.zarr")
    spec_file = tmp_path / "free.toml"
    spec_file.write_text(HEADS_FILE)

    def run(**overrides):
        cfg = SweepConfig(cache=cache, out=str(tmp_path / "sweep"),
                          **{"seeds": (0, 1), "episodes": 12, **overrides})
        lines = []
        summary = sweep_command(str(spec_file), cfg, log=lines.append)
        return summary, lines

    return run, cache, spec_file


def test_every_run_of_a_seed_is_scored_on_the_same_saved_episodes(free_sweep):
    run, cache, _ = free_sweep
    summary, lines = run()
    out = Path(summary["out"])
    assert {Path(p).name for p in summary["files"].values()} == {
        "sweep.csv", "sweep.md", "sweep.json", "sweep.png"}
    reports = {(r["run"], r["seed"]): json.loads((out / r["run_dir"] / "eval.json").read_text())
               for r in summary["runs"]}
    for seed in (0, 1):
        files = {reports[(name, seed)]["episodes_from"] for name in ("protonet", "otam")}
        assert len(files) == 1, files
        assert reports[("protonet", seed)]["seed"] == seed
    # the saved episodes are the draw `evaluate --seed S` makes: the same accuracy
    with FeatureCache.open(cache) as opened:
        direct = evaluate(build_head("protonet", channels=8, frames=8, height=4, width=4),
                          opened, EvalConfig(episodes=12, seed=1), device=torch.device("cpu"),
                          progress=False)
    assert direct["episode_accuracy"] == reports[("protonet", 1)]["episode_accuracy"]
    # the row statistics come from those reports: mean over seeds, paired test over episodes
    otam = next(r for r in summary["rows"] if r["run"] == "otam")
    accs = [round(reports[("otam", s)]["accuracy"], 4) for s in (0, 1)]  # as sweep.csv has them
    assert otam["mean"] == pytest.approx(np.mean(accs))
    assert otam["std"] == pytest.approx(np.std(accs, ddof=1))
    pooled = {n: np.concatenate([reports[(n, s)]["episode_accuracy"] for s in (0, 1)])
              for n in ("protonet", "otam")}
    assert otam["vs"] == "protonet"
    assert otam["paired"]["episodes"] == pytest.approx(
        paired_test(pooled["protonet"], pooled["otam"]))
    by_seed = [[reports[(n, s)]["accuracy"] for s in (0, 1)] for n in ("protonet", "otam")]
    assert otam["paired"]["seeds"] == pytest.approx(paired_test(*by_seed))
    table = (out / "sweep.md").read_text()
    assert "| otam |" in table and "(reference)" in table and "ttest_rel" in table
    assert any("4 to run" in line for line in lines)


@pytest.mark.slow
def test_a_rerun_skips_finished_runs(free_sweep):
    run, _, _ = free_sweep
    first, _ = run()
    out = Path(first["out"])
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/eval.json")}
    table = read_csv(out / "sweep.csv", timings=True)
    second, lines = run()
    assert any("4 done, 0 to resume, 0 to run" in line for line in lines), lines
    assert len(stamps) == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/eval.json")} == stamps
    assert read_csv(out / "sweep.csv", timings=True) == table  # the recorded timings too
    assert second["rows"] == first["rows"]


@pytest.mark.slow
def test_changed_runs_are_refused_with_the_difference_named(free_sweep):
    run, _, spec_file = free_sweep
    run()
    with pytest.raises(UserError, match=r"test\.episodes 12 on disk vs 13 now"):
        run(episodes=13)
    spec_file.write_text(HEADS_FILE.replace('head = "otam"', 'head = "protonet"'))
    with pytest.raises(UserError, match=r"options\.head 'otam' on disk vs 'protonet' now"):
        run()


def test_a_folder_the_sweep_did_not_write_is_refused(free_sweep, tmp_path):
    run, _, _ = free_sweep
    foreign = tmp_path / "sweep" / "runs" / "otam-1shot-seed0"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write|not made by this tool"):
        run()
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_and_a_rerun_finishes_it(free_sweep, tmp_path, monkeypatch):
    """Ctrl-C inside a run's training: train saves last.pt, the sweep stops without a table;
    the rerun skips the finished runs and resumes that one."""
    run, _, spec_file = free_sweep
    spec_file.write_text("shots = [1]\n" + HEADS_FILE  # the tiny cache holds 6 videos a class
                         + '[[run]]\nname = "ta2n"\nhead = "ta2n"\nepochs = 2\n'
                         'episodes-per-epoch = 4\nval-episodes = 2\nqueries = 2\n')
    real_train = align.sweep.runner.train

    def interrupted_train(cfg, **kwargs):
        def ctrl_c(epoch, episode):
            if (epoch, episode) == (1, 2):
                os.kill(os.getpid(), signal.SIGINT)  # the real signal path, handled by train
        return real_train(cfg, on_episode=ctrl_c, **kwargs)

    monkeypatch.setattr(align.sweep.runner, "train", interrupted_train)
    stopped, _ = run(seeds=(0,))
    assert stopped["interrupted"] and "rerun the same command" in format_sweep(stopped)
    assert not (tmp_path / "sweep" / "sweep.csv").exists()
    assert (tmp_path / "sweep" / "runs" / "ta2n-1shot-seed0" / "last.pt").exists()
    monkeypatch.setattr(align.sweep.runner, "train", real_train)
    finished, lines = run(seeds=(0,))
    assert any("2 done, 1 to resume, 0 to run" in line for line in lines), lines
    ta2n = next(r for r in finished["runs"] if r["run"] == "ta2n")
    assert ta2n["epochs_done"] == 2 and (tmp_path / "sweep" / "sweep.csv").exists()


def test_sweep_command_line(tmp_path, monkeypatch, make_synth):
    monkeypatch.chdir(tmp_path)
    cache = make_synth(tmp_path / "tiny.zarr")
    runner = CliRunner()
    args = ["sweep", "heads", "--heads", "protonet,otam", "--cache", cache, "--seeds", "3",
            "--episodes", "10", "--devices", "cpu"]
    result = runner.invoke(cli.cli, args)
    assert result.exit_code == 0, result.output
    assert "| otam |" in result.output and "runs/sweep-heads-tiny/sweep.csv" in result.output
    assert Path("runs/sweep-heads-tiny/sweep.png").exists()
    result = runner.invoke(cli.cli, args[:-4] + ["--seeds", "a"])
    assert result.exit_code == 1 and "--seeds takes comma-separated integers" in result.output
    result = runner.invoke(cli.cli, ["sweep", "table3", "--set", "epoch=3", "--cache", cache])
    assert result.exit_code == 1 and "unknown option 'epoch'" in result.output


# ------------------------------------------------------------------------------ end to end
def table3_config(cache, out, **overrides):
    return SweepConfig(cache=cache, out=str(out), seeds=(0, 1), episodes=20, overrides=BUDGET,
                       devices=("cpu",), **overrides)


@pytest.fixture(scope="module")
def table3_serial(tmp_path_factory):
    """table3 with 2 seeds, serially in this process: the reference the other runs must equal."""
    from cache.synthetic import SynthConfig, generate_synthetic
    from tests.align.conftest import TINY_SYNTH

    root = tmp_path_factory.mktemp("table3")
    cache = str(root / "tiny.zarr")
    generate_synthetic(cache, SynthConfig(**TINY_SYNTH), progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        summary = run_sweep(load_spec("table3"), table3_config(cache, root / "serial"), log=quiet)
    return root, cache, summary


@pytest.mark.slow
def test_two_processes_give_the_serial_csv(table3_serial, monkeypatch):
    root, cache, serial = table3_serial
    monkeypatch.chdir(root)
    parallel = run_sweep(load_spec("table3"), table3_config(cache, root / "two", jobs=2),
                         log=quiet)
    serial_csv = read_csv(serial["files"]["csv"])
    assert len(serial_csv) == 12 and {r["seed"] for r in serial_csv} == {"0", "1"}
    assert read_csv(parallel["files"]["csv"]) == serial_csv

    def untimed(rows):  # a row's seconds to best are timings, as the CSV's are
        return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]

    assert untimed(parallel["rows"]) == untimed(serial["rows"])


def test_to_best_is_the_first_best_validated_epoch():
    rows = [{"epoch": e, "val_acc": v, "epoch_time_s": t}
            for e, v, t in [(1, 50.0, 2.0), (2, None, 3.0), (3, 61.0, 4.0), (4, 61.0, 5.0),
                            (5, 55.0, 6.0)]]
    summary = {"history": rows, "config": {"episodes_per_epoch": 10}}
    assert to_best(summary) == {"best_epoch": 3, "episodes_to_best": 30, "train_s_to_best": 9.0}
    unvalidated = [{**row, "val_acc": None} for row in rows]  # best.pt is the last epoch
    assert to_best({**summary, "history": unvalidated})["best_epoch"] == 5
    assert to_best(None) == {"best_epoch": None, "episodes_to_best": None,
                             "train_s_to_best": None}


@pytest.mark.slow
def test_each_trained_run_reports_its_way_to_the_tested_checkpoint(table3_serial):
    """sweep.csv: the epoch of best.pt (the first best val accuracy of metrics.csv), the
    episodes and training seconds before it; sweep.md: the seeds' means per row."""
    root, cache, serial = table3_serial
    out = Path(serial["out"])
    lines = read_csv(serial["files"]["csv"], timings=True)
    for line in lines:
        if line["head"] == "protonet":
            assert line["best_epoch"] == line["episodes_to_best"] == "", line
            continue
        with open(out / line["run_dir"] / "metrics.csv", newline="") as f:
            metrics = list(csv.DictReader(f))
        accs = [float(m["val_acc"]) for m in metrics]
        best = int(metrics[int(np.argmax(accs))]["epoch"])
        assert int(line["best_epoch"]) == best
        assert int(line["episodes_to_best"]) == best * BUDGET["episodes_per_epoch"]
        seconds = sum(float(m["epoch_time_s"]) for m in metrics[:best])
        assert float(line["train_s_to_best"]) == pytest.approx(seconds, abs=2e-3)
    row = next(r for r in serial["rows"] if r["run"] == "TTM")
    ttm = [int(x["episodes_to_best"]) for x in lines if x["run"] == "TTM"]
    assert row["episodes_to_best"] == pytest.approx(np.mean(ttm))
    table = Path(serial["files"]["markdown"]).read_text()
    assert "episodes to best" in table and f"| {np.mean(ttm):.0f} |" in table


@pytest.mark.slow
def test_a_killed_sweep_continues_to_the_same_table(table3_serial, monkeypatch):
    """A real SIGKILL of a sweep (one process per device) while an SC run trains, then a rerun:
    it resumes that run from its last.pt and ends with the uninterrupted sweep's CSV."""
    root, cache, serial = table3_serial
    monkeypatch.chdir(root)
    out = root / "killed"
    sets = [f"--set={k}={v}" for k, v in BUDGET.items()]
    command = [sys.executable, str(ROOT / "cli.py"), "sweep", "table3", "--cache", cache,
               "--seeds", "0,1", "--episodes", "20", "--devices", "cpu,cpu", "--out", str(out),
               *sets]
    with open(root / "killed.log", "w") as log:
        proc = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        partial = wait_for_a_partly_trained_sc_run(out, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker processes
        proc.wait()
    assert partial and not (out / "sweep.csv").exists()
    lines = []
    resumed = run_sweep(load_spec("table3"), table3_config(cache, out), log=lines.append)
    header = next(line for line in lines if line.startswith("sweep"))
    assert "0 to resume" not in header, header
    assert read_csv(resumed["files"]["csv"]) == read_csv(serial["files"]["csv"])


def wait_for_a_partly_trained_sc_run(out: Path, proc, timeout: float = 600.0) -> Path:
    """An SC run directory with last.pt (an epoch done) and no result yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run_dir in out.glob("runs/*-sc-1shot-seed*"):
            record = run_dir / RUN_FILE
            if (run_dir / "last.pt").exists() and record.exists() \
                    and "result" not in json.loads(record.read_text()):
                return run_dir
        assert proc.poll() is None, (out.parent / "killed.log").read_text()
        time.sleep(0.02)
    raise AssertionError("no SC run reached its first epoch in time")
