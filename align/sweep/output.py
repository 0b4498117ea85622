"""A sweep's outputs: sweep.csv (a line per run and seed), sweep.md (the paper-style
table), sweep.json; the bar chart is drawn by the ``draw`` callback
(align/reports/sweep.py)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from align.stats import format_p
from cache.atomic import atomic_path, write_json, write_text

CSV_FIELDS = ("run", "shot", "seed", "head", "options", "accuracy", "ci95", "episodes",
              "best_val_acc", "epochs_done", "episodes_file", "run_dir", "device",
              "train_time_s", "eval_time_s", "best_epoch", "episodes_to_best", "train_s_to_best")
TIMING_FIELDS = ("train_time_s", "eval_time_s", "train_s_to_best")


# ------------------------------------------------------------------------------ outputs
def write_outputs(summary: dict, out: Path, draw: Callable | None) -> dict:
    """sweep.csv, sweep.md, the figure (when ``draw`` is given), then sweep.json naming them."""
    files = {"csv": out / "sweep.csv", "markdown": out / "sweep.md", "json": out / "sweep.json"}
    if draw is not None:
        files["figure"] = out / "sweep.png"
    summary["files"] = {k: str(v) for k, v in files.items()}
    with atomic_path(files["csv"]) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(summary["runs"])
    write_text(files["markdown"], format_markdown(summary))
    if draw is not None:
        draw(summary, files["figure"])
    write_json(files["json"], summary)
    return summary


def _cell(mean: float, spread: float | None) -> str:
    return f"{mean:.2f}" + ("" if spread is None else f" +- {spread:.2f}")


def format_markdown(summary: dict) -> str:
    """The paper-style table: a line per row (a K column when there are several K)."""
    test, rows = summary["test"], summary["rows"]
    seeds = test["seeds"]
    several_k = len({r["shot"] for r in rows}) > 1
    best = {k: max(r["mean"] for r in rows if r["shot"] == k) for k in {r["shot"] for r in rows}}
    head = (["run"] + (["K"] if several_k else []) + [f"seed {s}" for s in seeds]
            + ["mean +- std" if len(seeds) > 1 else "mean", "vs", "gain [95% CI]",
               "p (episodes)", "p (seeds)", "episodes to best", "train s to best"])
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for r in rows:
        mean = _cell(r["mean"], r["std"])
        mean = f"**{mean}**" if r["mean"] == best[r["shot"]] else mean
        compare = ["", "(reference)", "", ""] if r["paired"] is None else _comparison(r)
        cells = ([r["run"].replace("|", "\\|")] + ([str(r["shot"])] if several_k else [])
                 + [_cell(s["accuracy"], s["ci95"]) for s in r["seeds"]] + [mean] + compare
                 + _to_best_cells(r))
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join([_caption(summary), "", *lines, ""])


def _to_best_cells(row: dict) -> list[str]:
    """Training episodes and seconds to the tested checkpoint (seeds' mean; blank: no
    training)."""
    episodes, seconds = row.get("episodes_to_best"), row.get("train_s_to_best")
    return ["" if episodes is None else f"{episodes:.0f}",
            "" if seconds is None else f"{seconds:.0f}"]


def _comparison(row: dict) -> list[str]:
    """vs, gain [CI], p over episodes, p over seeds (blank with one seed)."""
    p, by_seed = row["paired"]["episodes"], row["paired"]["seeds"]
    return [row["vs"].replace("|", "\\|"),
            f"{p['gain']:+.2f} [{p['ci_low']:+.2f}, {p['ci_high']:+.2f}]", format_p(p["p"]),
            "" if by_seed is None else format_p(by_seed["p"])]


def _caption(summary: dict) -> str:
    test = summary["test"]
    shots = sorted({r["shot"] for r in summary["rows"]})
    budget = ", ".join(f"{k}={v}" for k, v in sorted(summary["shared_options"].items())
                       if k not in ("head", "head_options"))
    return (f"Sweep `{summary['title']}` on `{summary['cache']}`: {test['way']}-way "
            f"{'/'.join(map(str, shots))}-shot {test['split']} accuracy (%), every run scored "
            f"on the same {test['episodes']} saved episodes per seed (Q = {test['queries']}); "
            f"seed columns: mean +- 95% CI over the episodes; mean +- std (sample) over seeds "
            f"{', '.join(map(str, test['seeds']))}; gain: points over the row in 'vs' with its "
            f"95% CI over the pooled episodes; p (episodes): {summary['statistics']['episodes']}"
            f"; p (seeds): {summary['statistics']['seeds']}; episodes / train s to best: the "
            f"training episodes and seconds (validation not counted) before the best.pt each "
            f"run is tested with, seeds' mean."
            + (f" Trained runs: {budget}." if budget else ""))


def format_sweep(summary: dict) -> str:
    """What `sweep` prints at the end: the table and where the files are."""
    if summary["interrupted"]:
        return (f"interrupted: finished runs are kept in {summary['out']}; rerun the same "
                f"command to continue")
    return "\n".join([format_markdown(summary),
                      f"wall time  {summary['wall_time_s']:.1f} s (this invocation)",
                      "wrote      " + ", ".join(summary["files"].values())])
