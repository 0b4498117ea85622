"""Sweeps on a Dask distributed cluster: ``python cli.py sweep ... --scheduler ADDRESS``.

align/sweep/ plans a sweep and hands its runs here when ``SweepConfig.scheduler`` is set. This
module owns:

* **connecting**: ``tcp://HOST:PORT`` (a running scheduler), a scheduler file (``dask scheduler
  --scheduler-file``, dask-jobqueue) or ``local:N`` (a local cluster of N worker processes);
* the **shared-filesystem check** before any run: every worker that will run tasks opens the
  cache's metadata (and must see the same rows as this machine), reads a probe file this machine
  wrote into the sweep folder and writes one back; the workers that cannot are named in one line;
* **dispatch**: one Dask task per run - align/sweep/runner.py's ``execute_run``, unchanged, so a
  run's result is a function of its config wherever it runs - the costliest first; when workers
  declare a ``GPU`` resource, each run takes ``GPU=1`` and runs only there;
* **faults**: a worker that dies mid-run - the scheduler runs the task again on another worker,
  which resumes from the run's last.pt; a run that raises - recorded in its sweep-run.json, the
  others finish, then one line names it; the scheduler gone - one line, and rerunning the same
  command continues from the runs that finished;
* **progress**: the lines a run logs on its worker, forwarded as Dask events, with where it runs
  (worker, host, pid) and the finished / running / queued counts; the dashboard address.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from align.sweep import RUN_FILE, RunPlan, SweepConfig, execute_run, slug
from cache import FeatureCache, UserError
from cache.atomic import write_json, write_text

CONNECT_TIMEOUT_S = 30.0  # reaching the scheduler (and reconnecting to it)
WORKERS_TIMEOUT_S = 120.0  # waiting for a first worker: batch-system workers start late
POLL_S = 0.5  # how often the console is brought up to date while runs go on
CLUSTER_DEVICES = ("auto", "cpu", "cuda")  # resolved on each worker: it alone sees its GPUs
PROBE = ".cluster-probe-"  # the shared-filesystem check's files in the sweep folder (removed)
_LOCAL = re.compile(r"local:(\d+)")
NANNY_ENV = "distributed.nanny.pre-spawn-environ"  # what nannies set before a worker starts


# ------------------------------------------------------------------------------ options
def check_cluster_config(cfg: SweepConfig) -> None:
    """One-line refusals of options that mean nothing on a cluster (before anything runs)."""
    parse_scheduler(cfg.scheduler)
    if cfg.jobs != 1:
        raise UserError("--jobs sets processes on this machine; with --scheduler the cluster's "
                        "workers run the runs (start as many as you want in parallel)")
    if len(cfg.devices) != 1 or cfg.devices[0] not in CLUSTER_DEVICES:
        raise UserError(f"with --scheduler every worker uses its own device: give --devices "
                        f"{', '.join(CLUSTER_DEVICES)} (one worker per GPU, or workers with a "
                        f"GPU=1 resource), got {','.join(cfg.devices)}")


def parse_scheduler(text: str) -> tuple[str, int | None]:
    """``local:N`` -> ("local", N); a scheduler address or scheduler file -> (it, None)."""
    local = _LOCAL.fullmatch(text)
    if local:
        if int(local.group(1)) < 1:
            raise UserError(f"--scheduler {text}: a local cluster needs at least one worker")
        return "local", int(local.group(1))
    if "://" in text or text.endswith(".json"):
        return text, None
    raise UserError(f"--scheduler {text!r}: expected tcp://HOST:PORT, a scheduler file "
                    f"(.json) or local:N (N worker processes on this machine)")


def worker_device(name: str) -> str:
    """--devices on a worker: ``auto`` is its GPU when it has one (cli.pick_device's rule,
    applied where the GPUs are)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# ------------------------------------------------------------------------------ connecting
def _distributed():
    try:
        import distributed
    except ImportError:
        raise UserError("--scheduler needs Dask's distributed: pip install -e '.[cluster]'") \
            from None
    return distributed


@contextmanager
def connect(scheduler: str) -> Iterator:
    """A Dask client of the scheduler (``local:N``: of a local cluster started here and shut
    down on exit, worker processes included)."""
    distributed = _distributed()
    address, workers = parse_scheduler(scheduler)
    cluster = None
    try:
        if workers is not None:
            cluster = _local_cluster(distributed, workers)
            client = distributed.Client(cluster)
        else:
            client = distributed.Client(_address(address), timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as e:
        if cluster is not None:
            cluster.close()
        raise UserError(f"cannot reach the Dask scheduler at {scheduler} ({_first_line(e)})") \
            from None
    try:
        yield client
    finally:
        with _quiet_logs(client.status != "running"):  # its reconnect tracebacks, if lost
            client.close(timeout=5)
        if cluster is not None:
            cluster.close(timeout=10)


def _local_cluster(distributed, workers: int):
    """``local:N``: N worker processes of one thread each, as a run in one process would be.

    Dask's nannies set ``MALLOC_TRIM_THRESHOLD_=65536`` in the workers they start
    (``distributed.nanny.pre-spawn-environ``). Setting it at all switches off glibc's dynamic
    mmap threshold, so every allocation above 128 KiB - most tensors of a run - is mmapped
    and unmapped again: page faults that cost a TA2N run about 1.3 s of system CPU here
    (docs/cluster.md). ``None`` drops it from what the nannies set (a value in this process's
    environment still goes through, as Dask's precedence says); their OMP_NUM_THREADS=1
    stays, and each run sets its torch threads itself (``--threads``).
    ``memory_limit=0``: Dask never kills a run for its memory, as the loky backend does not.
    """
    import dask.config  # (installed with distributed)

    with dask.config.set({f"{NANNY_ENV}.MALLOC_TRIM_THRESHOLD_": None}):
        return distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, memory_limit=0,
            host="127.0.0.1", dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)


def _address(scheduler: str) -> str:
    """An address, or the one in a scheduler file (read here: Dask's client would wait for a
    missing file forever)."""
    if not scheduler.endswith(".json"):
        return scheduler
    try:
        return json.loads(Path(scheduler).read_text())["address"]
    except OSError as e:
        raise UserError(f"cannot read the scheduler file {scheduler} ({e.strerror}); is the "
                        f"scheduler running?") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{scheduler} is not a Dask scheduler file (no address)") from None


@contextmanager
def _quiet_logs(quiet: bool) -> Iterator[None]:
    """Keep Dask's client logger quiet while closing a client whose scheduler is gone: the
    sweep's own one-line error says what happened."""
    logger = logging.getLogger("distributed.client")
    level = logger.level
    if quiet:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def pick_workers(client) -> tuple[list[str], dict | None, dict]:
    """(the workers that will run runs, the resources each run takes, every worker's info):
    those with a GPU resource if any declares one (a run takes GPU=1), else all."""
    try:
        client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
    except TimeoutError:
        raise UserError(f"no worker joined the Dask scheduler {client.scheduler.address} in "
                        f"{WORKERS_TIMEOUT_S:.0f} s; start some (dask worker ADDRESS)") from None
    info = client.scheduler_info(n_workers=-1)["workers"]
    gpu = sorted(a for a, w in info.items() if (w.get("resources") or {}).get("GPU", 0) >= 1)
    return (gpu, {"GPU": 1}, info) if gpu else (sorted(info), None, info)


def describe_cluster(client, workers: list[str], resources: dict | None, info: dict) -> str:
    hosts = sorted({info[a]["host"] for a in workers})
    threads = sum(info[a]["nthreads"] for a in workers)
    slots = (f"one run per GPU resource ({len(workers)} GPU workers)" if resources
             else f"{threads} runs at a time (worker threads)")
    dashboard = client.dashboard_link
    return (f"cluster {client.scheduler.address}: {len(workers)} workers on {len(hosts)} hosts "
            f"({', '.join(hosts)}), {slots}"
            + (f"; dashboard {dashboard}" if dashboard else "; no dashboard"))


# ------------------------------------------------------------------------------ shared files
def cache_facts(cache_path: str) -> dict:
    """What two machines must agree on to be reading the same cache."""
    with FeatureCache.open(cache_path) as cache:
        return {"rows": len(cache), "done": int(cache.done.sum()), "shape": list(cache.shape)}


def _probe_name(token: str, worker: str) -> str:
    return f"{PROBE}{token}-{hashlib.sha1(worker.encode()).hexdigest()[:12]}"


def probe_worker(cache_path: str, out: str, token: str, expected: dict, device: str,
                 dask_worker=None) -> list[str]:
    """On a worker: what stops it from running this sweep's runs (empty: nothing)."""
    problems = []
    try:
        facts = cache_facts(cache_path)
        if facts != expected:
            problems.append(f"sees another cache at {cache_path} ({facts} there, {expected} "
                            f"here)")
    except Exception as e:  # whatever stops it reading the cache is the answer, not a crash
        problems.append(f"cannot read the cache's metadata ({_first_line(e)})")
    folder = Path(out)
    try:
        if (folder / f"{PROBE}{token}").read_text() != token:
            problems.append(f"sees other files in the sweep folder {out}")
    except OSError as e:
        problems.append(f"cannot read the sweep folder {out} ({e.strerror or e})")
    try:  # no mkdir: a folder missing here must not be created on the worker's own disk
        with open(folder / _probe_name(token, dask_worker.address), "x") as f:
            f.write(token)
    except OSError as e:
        problems.append(f"cannot write the sweep folder {out} ({e.strerror or e})")
    if device == "cuda" and not torch.cuda.is_available():
        problems.append("sees no CUDA device (--devices cuda)")
    return problems


def check_shared_files(client, workers: list[str], info: dict, cache_path: str, out: Path,
                       device: str) -> None:
    """Refuse in one line, naming them, the workers that cannot read the cache's metadata or
    read and write the sweep folder as this machine sees them."""
    token = uuid.uuid4().hex
    write_text(out / f"{PROBE}{token}", token)
    try:
        answers = client.run(probe_worker, cache_path, str(out), token, cache_facts(cache_path),
                             device, workers=workers, on_error="return")
        problems = []
        for address in workers:
            answer = answers.get(address)
            if isinstance(answer, BaseException):
                answer = [f"could not be asked ({_first_line(answer)})"]
            elif answer is None:
                answer = ["left the cluster during the check"]
            elif not answer and not (out / _probe_name(token, address)).exists():
                answer = [f"writes the sweep folder {out} where this machine does not see it"]
            if answer:
                problems.append(f"{address} ({info[address]['host']}): {'; '.join(answer)}")
    finally:
        for path in out.glob(f"{PROBE}{token}*"):
            path.unlink(missing_ok=True)
    if problems:
        raise UserError(f"{len(problems)} of {len(workers)} workers cannot run this sweep (the "
                        f"cache and the sweep folder must be on a filesystem every worker "
                        f"mounts at the same path): {' | '.join(problems)}")


# ------------------------------------------------------------------------------ one run
def run_task(plan: RunPlan, device: str, threads: int, topic: str) -> dict:
    """On a worker: execute_run, its lines forwarded to the client as events on ``topic``."""
    from distributed import get_worker

    worker = get_worker()
    where = {"worker": worker.address, "host": socket.gethostname(), "pid": os.getpid()}

    def forward(line: str) -> None:
        worker.log_event(topic, {"index": plan.index, "line": line, **where})

    if not Path(plan.episodes_file).exists():  # a worker that joined after the check
        raise UserError(f"worker {worker.address} ({where['host']}) does not see "
                        f"{plan.episodes_file}: the sweep folder must be on a shared filesystem")
    return {**execute_run(plan, worker_device(device), threads, forward), **where}


# ------------------------------------------------------------------------------ the sweep
class Progress:
    """The console's view: a line per event, with where each run is and the counts."""

    def __init__(self, plans: list[RunPlan], log: Callable):
        self.tags = {p.index: p.tag for p in plans}
        self.total, self.log = len(plans), log
        self.running: dict[int, str] = {}  # run index -> worker address
        self.finished: set[int] = set()

    def counts(self) -> str:
        queued = self.total - len(self.finished) - len(self.running)
        return f"{len(self.finished)} finished, {len(self.running)} running, {queued} queued"

    def run_event(self, msg: dict) -> None:
        """A line a run logged on its worker."""
        if msg["index"] not in self.finished:  # (a late line must not revive a finished run)
            self.running[msg["index"]] = msg["worker"]
        self.log(f"{msg['line']} at {msg['worker']} ({msg['host']}, pid {msg['pid']})")

    def worker_left(self, address: str) -> None:
        lost = [i for i, w in self.running.items() if w == address]
        for index in lost:
            del self.running[index]
        if lost:
            self.log(f"worker {address} left the cluster during "
                     f"{', '.join(self.tags[i] for i in lost)}: the scheduler runs "
                     f"{'it' if len(lost) == 1 else 'them'} again on another worker (resuming "
                     f"from last.pt) - {self.counts()}")

    def done(self, index: int) -> None:
        self.running.pop(index, None)
        self.finished.add(index)


def run_on_cluster(plans: list[RunPlan], cfg: SweepConfig, log: Callable) -> list[dict]:
    """align/sweep/runner.py's dispatch on a Dask cluster: check the workers see the files, submit
    a task per run, follow them; the finished runs' results. Raises a one-line UserError when a
    run failed (after the others finished) or the scheduler went away."""
    out = Path(plans[0].run_dir).parents[1]  # <out>/runs/<run>
    cache_path = plans[0].train["cache"]
    with connect(cfg.scheduler) as client:
        workers, resources, info = pick_workers(client)
        log(describe_cluster(client, workers, resources, info))
        check_shared_files(client, workers, info, cache_path, out, cfg.devices[0])
        return _follow(client, plans, cfg, resources, out, log)


def _follow(client, plans: list[RunPlan], cfg: SweepConfig, resources: dict | None, out: Path,
            log: Callable) -> list[dict]:
    events: queue.SimpleQueue = queue.SimpleQueue()
    topic = f"ta2n-sweep-{uuid.uuid4().hex}"
    client.subscribe_topic(topic, lambda event: events.put(("run", event[1])))
    client.subscribe_topic("all", lambda event: events.put(("cluster", event[1])))
    try:
        return _submit_and_wait(client, plans, cfg, resources, out, log, events, topic)
    finally:
        if client.status == "running":  # else the scheduler writes to a closed client
            client.unsubscribe_topic(topic)
            client.unsubscribe_topic("all")


def _submit_and_wait(client, plans: list[RunPlan], cfg: SweepConfig, resources: dict | None,
                     out: Path, log: Callable, events: queue.SimpleQueue, topic: str
                     ) -> list[dict]:
    distributed = _distributed()
    token = uuid.uuid4().hex[:8]
    futures = {}  # future -> plan; the costliest first, as align/sweep/runner.py balances devices
    for plan in sorted(plans, key=lambda p: (-p.cost, p.index)):
        key = f"{slug(plan.name)}-{plan.shot}shot-seed{plan.seed}-{token}"
        futures[client.submit(run_task, plan, cfg.devices[0], cfg.threads, topic, key=key,
                              pure=False, resources=resources)] = plan
    progress = Progress(plans, log)
    results, failed, pending = [], [], set(futures)
    while pending:
        try:
            done, pending = distributed.wait(pending, timeout=POLL_S,
                                             return_when="FIRST_COMPLETED")
        except TimeoutError:
            done = set()
        except distributed.client.FuturesCancelledError:  # the scheduler is gone
            done = {f for f in pending if f.status == "cancelled"}
        except KeyboardInterrupt:  # the sweep reports itself interrupted (fewer results)
            client.cancel(list(pending))
            log(f"interrupted: {progress.counts()}; a run already going on a worker of a "
                f"cluster started elsewhere finishes there (Dask cannot stop it)")
            return results
        _drain(events, progress)
        for future in done:
            plan = futures[future]
            if future.status == "finished":
                results.append(future.result())
            elif future.status == "error":
                failed.append(_record_failure(plan, future.exception(),
                                              progress.running.get(plan.index)))
                log(f"failed {failed[-1]}")
            else:  # cancelled: the scheduler is gone (or someone cancelled our tasks)
                raise UserError(
                    f"lost the Dask scheduler {cfg.scheduler} ({len(results)} of {len(plans)} "
                    f"runs finished, kept in {out}): start it and its workers again and "
                    f"rerun the same command to continue")
            progress.done(plan.index)
        if done:
            log(f"runs   {progress.counts()}")
    if failed:
        raise UserError(f"{len(failed)} of {len(plans)} runs failed (the others finished, kept "
                        f"in {out}; rerunning the same command retries the failed): "
                        f"{' | '.join(failed)}")
    return results


def _drain(events: queue.SimpleQueue, progress: Progress) -> None:
    while True:
        try:
            kind, msg = events.get_nowait()
        except queue.Empty:
            return
        if kind == "run":
            progress.run_event(msg)
        elif msg.get("action") == "remove-worker":
            progress.worker_left(msg["worker"])


def _record_failure(plan: RunPlan, error: BaseException, worker: str | None) -> str:
    """The failure in the run's sweep-run.json (no result: a rerun runs it again); its line."""
    message = f"{type(error).__name__}: {_first_line(error)}"
    where = f" on {worker}" if worker else ""
    write_json(Path(plan.run_dir) / RUN_FILE, {"requested": plan.requested,
                                               "failed": {"error": message, "worker": worker}})
    return f"{plan.tag}{where}: {message}"


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "message", None) or error).strip() or type(error).__name__
    line = text.splitlines()[0]
    return line if len(line) <= 300 else line[:297] + "..."
