"""Sweeps on a real Dask cluster: a scheduler and worker processes started here on 127.0.0.1
(ports the OS picks), each in its own process group that is killed by PID at the end. Checked:
the cluster's sweep.csv equals the serial one (timings apart), the shared-filesystem refusal, a
worker SIGKILLed mid-run, a run that raises, the scheduler gone and the rerun that continues."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import distributed  # the [cluster] extra, which `make test` installs
import pytest
from click.testing import CliRunner

import align.cluster
import cli
from align.sweep import RUN_FILE, SweepConfig, parse_spec, run_sweep
from cache import UserError
from tests.align.test_sweep import read_csv

ROOT = Path(__file__).resolve().parents[2]
# a training-free row and a trained one (a few seconds of training on the tiny cache)
SPEC = {"title": "cluster", "shots": [1], "run": [  # the tiny cache: 6 videos a class
    {"name": "protonet", "head": "protonet"},
    {"name": "ta2n", "head": "ta2n", "epochs": 3, "episodes_per_epoch": 4, "val_episodes": 2,
     "queries": 2, "tasks_per_batch": 2}]}
SPEC_TOML = """title = "cluster"
shots = [1]
[[run]]
name = "protonet"
head = "protonet"
[[run]]
name = "ta2n"
head = "ta2n"
epochs = 3
episodes-per-epoch = 4
val-episodes = 2
queries = 2
tasks-per-batch = 2
"""
STARTED = re.compile(r"^\[\d+/\d+\] (.+) started on cpu at (\S+) \(.*, pid (\d+)\)$")


def config(cache, out, **overrides) -> SweepConfig:
    return SweepConfig(cache=cache, out=str(out), **{"seeds": (0, 1), "episodes": 12,
                                                    "devices": ("cpu",), **overrides})


class Cluster:
    """A Dask scheduler and workers as processes of their own (``dask scheduler`` / ``dask
    worker``), importing this checkout; ``close`` kills each by its PID. The workers run
    without a nanny: one that is killed stays dead, as when its machine goes."""

    def __init__(self, root: Path):
        self.root, self.procs, self.address = root, [], None
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def _start(self, command: list[str], name: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "a")
        proc = subprocess.Popen(command, cwd=self.root, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def start_scheduler(self, port: int = 0, timeout: float = 60.0) -> str:
        """Its address (``port`` 0: one the OS picks)."""
        file = self.root / "scheduler.json"
        file.unlink(missing_ok=True)
        proc = self._start([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1",
                            "--port", str(port), "--dashboard-address", "127.0.0.1:0",
                            "--scheduler-file", str(file)], "scheduler")
        deadline = time.monotonic() + timeout
        while not file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, self.logs()
            time.sleep(0.05)
        self.scheduler, self.scheduler_file = proc, file
        self.address = json.loads(file.read_text())["address"]
        return self.address

    def start_workers(self, n: int, prefix: list[str] = ()) -> None:
        """``n`` more workers (one thread each); ``prefix`` wraps the command (unshare ...)."""
        expected = len(self.workers()) + n
        for _ in range(n):
            command = [sys.executable, "-m", "dask", "worker", self.address, "--nthreads", "1",
                       "--host", "127.0.0.1", "--no-dashboard", "--no-nanny",
                       "--local-directory", str(self.root / "dask-workers")]
            if prefix:  # the last element of the prefix is a shell line that ends in exec
                command = [*prefix[:-1], f"{prefix[-1]} {shlex.join(command)}"]
            self._start(command, f"worker-{len(self.procs)}")
        self.wait_for(expected)

    def workers(self) -> dict:
        with distributed.Client(self.address, timeout=10) as client:
            return client.scheduler_info(n_workers=-1)["workers"]

    def wait_for(self, n: int, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.workers()) != n:
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.2)

    def kill(self, proc: subprocess.Popen) -> None:
        """The process and its children (a nanny's worker): its own process group."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in reversed(self.procs):  # workers first, the scheduler last
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # a worker that closed itself when its scheduler went
            proc.wait(timeout=30)
        self.procs = []

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.root.glob("*.log")))


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The tiny cache and the sweep run serially in this process: the reference CSV."""
    from cache.synthetic import SynthConfig, generate_synthetic
    from tests.align.conftest import TINY_SYNTH

    root = tmp_path_factory.mktemp("cluster")
    cache = str(root / "tiny.zarr")
    generate_synthetic(cache, SynthConfig(**TINY_SYNTH), progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        summary = run_sweep(parse_spec(SPEC, "test"), config(cache, root / "serial"),
                            log=lambda line: None)
    return root, cache, read_csv(summary["files"]["csv"])


@pytest.fixture(scope="module")
def cluster(serial):
    root = serial[0] / "cluster"
    root.mkdir()
    running = Cluster(root)
    try:
        running.start_scheduler()
        running.start_workers(2)
        yield running
    finally:
        running.close()


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("args, message", [
    (["--scheduler", "node1:8786"], "expected tcp://HOST:PORT, a scheduler file"),
    (["--scheduler", "local:0"], "a local cluster needs at least one worker"),
    (["--scheduler", "local:2", "--jobs", "2"], "--jobs sets processes on this machine"),
    (["--scheduler", "local:2", "--devices", "cuda:0,cuda:1"], "every worker uses its own device"),
])
def test_cluster_options_are_refused_in_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.toml").write_text(SPEC_TOML)
    result = CliRunner().invoke(cli.cli, ["sweep", "spec.toml", "--cache", "none.zarr", *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_an_unreachable_scheduler_is_one_line(tmp_path, monkeypatch, make_synth):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(align.cluster, "CONNECT_TIMEOUT_S", 1.0)
    cache = make_synth(tmp_path / "tiny.zarr")

    def sweep(scheduler):
        run_sweep(parse_spec(SPEC, "test"), config(cache, tmp_path / "s", scheduler=scheduler),
                  log=lambda line: None)

    with pytest.raises(UserError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0"):
        sweep(f"tcp://127.0.0.1:{free_port()}")
    with pytest.raises(UserError, match=r"cannot read the scheduler file .*gone\.json \(No such"):
        sweep(str(tmp_path / "gone.json"))


def test_the_cluster_docs_commands_parse():
    """docs/cluster.md's `python cli.py` lines name options that exist (as README's do)."""
    from tests.test_readme import parse

    text = (ROOT / "docs" / "cluster.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"python cli\.py ([^#`\n]+)", text)
    assert len(commands) >= 4 and any("--scheduler local:4" in c for c in commands)
    for command in commands:
        args = shlex.split(command)
        if len(args) == 1:  # a mention in prose: "`python cli.py sweep`"
            assert args[0] in cli.cli.commands
        else:
            parse(args)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ a local cluster
@pytest.mark.slow
def test_local_cluster_from_the_command_line_gives_the_serial_csv(serial, monkeypatch):
    """``--scheduler local:2`` (the training-free row of the sweep: the trained one is on
    the tcp:// cluster below)."""
    root, cache, serial_csv = serial
    monkeypatch.chdir(root)
    (root / "spec.toml").write_text(SPEC_TOML.split("[[run]]\nname = \"ta2n\"")[0])
    result = CliRunner().invoke(cli.cli, [
        "sweep", "spec.toml", "--cache", cache, "--seeds", "0,1", "--episodes", "12",
        "--devices", "cpu", "--scheduler", "local:2", "--out", "local"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    cluster_line = next(line for line in lines if line.startswith("cluster tcp://127.0.0.1:"))
    assert "2 workers on 1 hosts" in cluster_line and "dashboard http://" in cluster_line
    where = {m.group(1): m.group(2) for m in map(STARTED.match, lines) if m}
    assert len(where) == 2, lines
    assert "runs   2 finished, 0 running, 0 queued" in lines
    assert read_csv(root / "local" / "sweep.csv") == [r for r in serial_csv
                                                      if r["run"] == "protonet"]


def worker_memory_and_threads() -> dict:
    """On a worker: its allocator setting, page faults per 1 MiB array allocated and freed,
    and torch's threads."""
    import resource

    import numpy as np
    import torch

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        np.ones(1 << 17)  # 1 MiB: above glibc's initial mmap threshold (128 KiB)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100
    return {"trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"), "faults": faults,
            "threads": torch.get_num_threads()}


@pytest.mark.slow
def test_local_workers_keep_the_allocator_and_one_thread_each(monkeypatch):
    """``local:N`` workers run as one process would: Dask's MALLOC_TRIM_THRESHOLD_=65536
    (which switches off glibc's dynamic mmap threshold: ~256 page faults for every 1 MiB
    allocation, +1.3 s of system CPU per TA2N run here) is not set in them, and each has one
    torch thread, as two runs on two cores should."""
    for name in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, "")  # (so that the nannies' leak into this process is undone)
        monkeypatch.delenv(name)
    with align.cluster.connect("local:2") as client:
        answers = client.run(worker_memory_and_threads)
    assert len(answers) == 2
    for answer in answers.values():
        assert answer["trim"] is None and answer["threads"] == 1, answer
        assert answer["faults"] < 16, answer  # (257 per allocation with Dask's setting)


# ------------------------------------------------------------------------------ a cluster
@pytest.mark.slow
def test_workers_that_cannot_see_the_files_are_named(serial, cluster):
    """A third worker in a mount namespace where the test folder is an empty tmpfs: it cannot
    read the cache or the sweep folder; the sweep refuses naming it (and only it)."""
    root, cache, _ = serial
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (root) to give one worker another filesystem")
    before = set(cluster.workers())
    count = len(cluster.procs)
    cluster.start_workers(1, prefix=["unshare", "-m", "sh", "-c",
                                     f"mount -t tmpfs tmpfs {root} && exec"])
    blind = next(iter(set(cluster.workers()) - before))
    try:
        with pytest.raises(UserError) as refused:
            run_sweep(parse_spec(SPEC, "test"), config(cache, root / "blind",
                                                       scheduler=cluster.address),
                      log=lambda line: None)
    finally:
        cluster.kill(cluster.procs[count])
        cluster.wait_for(len(before))
    message = refused.value.message
    assert message.startswith("1 of 3 workers cannot run this sweep") and "\n" not in message
    assert f"{blind} (127.0.0.1): cannot read the cache's metadata" in message
    assert "cannot read the sweep folder" in message and "cannot write the sweep folder" in message
    assert not any(f"{w} (" in message for w in before)
    assert not list((root / "blind").glob(".cluster-probe-*"))  # the probe files are removed


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_resumed_elsewhere(serial, cluster):
    """SIGKILL of the worker process training the ta2n run, once it has saved last.pt: the run
    goes on on another worker and the sweep ends with the serial CSV (seed 0's lines)."""
    root, cache, serial_csv = serial
    out = root / "killed"
    lines, pids = [], {}

    def log(line):
        lines.append(line)
        started = STARTED.match(line)
        if started:
            pids.setdefault(started.group(1), int(started.group(3)))

    killer = threading.Thread(target=kill_when_partly_trained, args=(out, pids.get, lines))
    killer.start()
    try:
        summary = run_sweep(parse_spec(SPEC, "test"), config(
            cache, out, seeds=(0,), scheduler=cluster.address), log=log)
    finally:
        killer.join()
    killed = next(line for line in lines if line.startswith("killed "))
    tag = killed.split(" ", 1)[1]
    assert any(line.startswith("worker tcp://") and "left the cluster during" in line
               and tag in line for line in lines), lines
    runs_of_tag = [m.group(2) for m in map(STARTED.match, lines) if m and m.group(1) == tag]
    assert len(runs_of_tag) == 2 and runs_of_tag[0] != runs_of_tag[1], lines
    assert not summary["interrupted"]
    assert read_csv(out / "sweep.csv") == [r for r in serial_csv if r["seed"] == "0"]


def kill_when_partly_trained(out: Path, pid_of: Callable[[str], int | None], lines: list,
                             timeout: float = 120.0) -> None:
    """SIGKILL ``pid_of("ta2n (K=1, seed S)")`` once that run has last.pt and no result yet
    (None: not known yet); "killed TAG" joins ``lines``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run_dir in sorted(out.glob("runs/ta2n-1shot-seed*")):
            record = run_dir / RUN_FILE
            if (run_dir / "last.pt").exists() and record.exists() \
                    and "result" not in json.loads(record.read_text()):
                tag = f"ta2n (K=1, seed {run_dir.name.rsplit('seed', 1)[1]})"
                if pid_of(tag) is not None:
                    os.kill(pid_of(tag), signal.SIGKILL)
                    lines.append(f"killed {tag}")
                    return
        time.sleep(0.01)


@pytest.mark.slow
def test_a_run_that_raises_is_recorded_and_named(serial, cluster):
    """A run that raises on its worker (7-way training on a 6-class train split): the other
    runs finish, its sweep-run.json says why, the sweep ends with one line naming it. (The
    cluster is reached through its scheduler file, as under a batch system.)"""
    root, cache, _ = serial
    spec = parse_spec({"title": "wide", "shots": [1], "run": [
        {"name": "protonet", "head": "protonet"},
        {"name": "wide", "head": "ta2n", "way": 7, "epochs": 1}]}, "test")
    out = root / "wide"
    with pytest.raises(UserError) as failed:
        run_sweep(spec, config(cache, out, seeds=(0,), scheduler=str(cluster.scheduler_file)),
                  log=lambda line: None)
    message = failed.value.message
    assert message.startswith("1 of 2 runs failed") and "\n" not in message
    assert re.search(r"\[2/2\] wide \(K=1, seed 0\) on tcp://127\.0\.0\.1:\d+: UserError: "
                     r".*fewer than --way 7", message), message
    record = json.loads((out / "runs" / "wide-1shot-seed0" / RUN_FILE).read_text())
    assert "fewer than --way 7" in record["failed"]["error"] and "result" not in record
    assert "result" in json.loads((out / "runs" / "protonet-1shot-seed0" / RUN_FILE).read_text())
    assert not (out / "sweep.csv").exists()


@pytest.mark.slow
def test_the_scheduler_gone_is_one_line_and_the_same_command_continues(serial, cluster):
    """SIGKILL of the scheduler while the ta2n run trains (last.pt saved): one line; the same
    command, once the scheduler (same address) and a worker are back, continues from what is
    on disk and ends with the serial CSV. (The module's cluster, with one worker left since a
    test above killed the other: this test runs last.)"""
    root, cache, serial_csv = serial
    out = root / "gone"
    address, lines = cluster.address, []
    killer = threading.Thread(target=kill_when_partly_trained,
                              args=(out, lambda tag: cluster.scheduler.pid, lines))
    killer.start()
    try:
        with pytest.raises(UserError) as lost:
            run_sweep(parse_spec(SPEC, "test"), config(cache, out, seeds=(0,),
                                                       scheduler=address), log=lines.append)
    finally:
        killer.join()
    message = lost.value.message
    assert "killed ta2n (K=1, seed 0)" in lines
    assert re.match(rf"lost the Dask scheduler {address} \([01] of 2 runs finished", message)
    assert "rerun the same command to continue" in message and "\n" not in message, message
    cluster.close()  # the worker (which stops without its scheduler)
    assert cluster.start_scheduler(port=int(address.rsplit(":", 1)[1])) == address
    cluster.start_workers(1)
    lines = []
    summary = run_sweep(parse_spec(SPEC, "test"), config(cache, out, seeds=(0,),
                                                         scheduler=address), log=lines.append)
    header = next(line for line in lines if line.startswith("sweep"))
    assert "0 done, 0 to resume" not in header, header  # the first attempt's work is kept
    assert not summary["interrupted"]
    assert read_csv(out / "sweep.csv") == [r for r in serial_csv if r["seed"] == "0"]
