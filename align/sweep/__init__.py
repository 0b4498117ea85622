"""Sweeps (`python cli.py sweep`): a whole paper table - many heads or ablations, several seeds -
as one command, on identical test episodes, with paired significance tests.

One module per concern:

* ``spec``: presets (``table3``, ``table4``, ``heads``, ``table2``, ``shots``) and sweep files
  (TOML or JSON) listing runs as train-heads option sets, validated against ``TrainConfig``'s
  fields by name (so options added to training pass straight through);
* ``plan``: ``SweepConfig``, one ``RunPlan`` per (row, K, seed), each a normal run directory
  under the sweep folder; the test episodes saved once per (split, way, K, queries, episodes,
  seed) and replayed for every run; resume state (a rerun skips finished runs, resumes runs
  that have last.pt and refuses a run whose recorded options differ, naming the difference);
* ``runner``: one run (train, evaluate), the runs spread over processes or devices through
  joblib (or over a Dask cluster, align/cluster.py) and ``run_sweep``, the entry point;
* ``summary``: mean +- std over seeds and the paired test of each row against its reference
  (align/stats.py);
* ``output``: sweep.csv, sweep.md (the paper-style table), sweep.json; the bar chart is drawn by
  the ``draw`` callback (align/reports/sweep.py).

The names below are the package's public interface (cli.py, align/cluster.py,
align/reports/sweep.py, bench/ and the tests import them from ``align.sweep``).
"""

from align.sweep.output import CSV_FIELDS, TIMING_FIELDS, format_markdown, format_sweep
from align.sweep.plan import (
    REPORT_FILE,
    RUN_FILE,
    RunPlan,
    SweepConfig,
    plan_runs,
    resolve_reference,
    row_keys,
    run_state,
)
from align.sweep.runner import (
    balance,
    describe_workers,
    dispatch,
    execute_queue,
    execute_run,
    run_sweep,
    to_best,
)
from align.sweep.spec import (
    PRESETS,
    RunSpec,
    SweepSpec,
    load_spec,
    normalise_options,
    option_names,
    parse_assignments,
    parse_spec,
    preset_payload,
    slug,
)
from align.sweep.summary import summarise

__all__ = [
    "CSV_FIELDS", "PRESETS", "REPORT_FILE", "RUN_FILE", "TIMING_FIELDS", "RunPlan", "RunSpec",
    "SweepConfig", "SweepSpec", "balance", "describe_workers", "dispatch", "execute_queue",
    "execute_run", "format_markdown", "format_sweep", "load_spec", "normalise_options",
    "option_names", "parse_assignments", "parse_spec", "plan_runs", "preset_payload",
    "resolve_reference", "row_keys", "run_state", "run_sweep", "slug", "summarise", "to_best",
]
