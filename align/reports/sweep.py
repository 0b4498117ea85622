"""`python cli.py sweep`'s figure and command: runs the sweep engine (align/sweep/) and draws
its bar chart - a bar per row (grouped by K), the mean over seeds, error bars and seed dots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from align.stats import format_p
from align.sweep import SweepConfig, load_spec, run_sweep


def plot_sweep(summary: dict, path: Path) -> None:
    """Bars: mean accuracy over seeds; error bars: std over seeds (the seed's 95% CI when there
    is one seed); dots: each seed; above a compared bar: its paired tests' p against its 'vs'
    row, over episodes and over seeds."""
    rows = summary["rows"]
    shots = sorted({r["shot"] for r in rows})
    names = list(dict.fromkeys(r["run"] for r in rows))
    width = 0.8 / len(shots)
    fig = Figure(figsize=(max(5.0, 1.1 * len(names) * max(1, len(shots) / 2) + 1.5), 4.2),
                 dpi=120)
    ax = fig.subplots()
    for j, shot in enumerate(shots):
        for r in (r for r in rows if r["shot"] == shot):
            x = names.index(r["run"]) + (j - (len(shots) - 1) / 2) * width
            _bar(ax, x, width, r, color=f"C{j}", label=f"K = {shot}" if len(shots) > 1 else None)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{summary['test']['split']} accuracy (%)")
    ax.set_xlabel("p ep / p seeds: paired t-tests against the row's 'vs' row over episodes / "
                  "over seeds (sweep.md)", fontsize=8)
    one_seed = len(summary["test"]["seeds"]) == 1
    ax.set_title(f"sweep {summary['title']}: {summary['test']['way']}-way, "
                 f"{summary['test']['episodes']} episodes per seed; error bars: "
                 f"{'95% CI' if one_seed else 'std over seeds'}", fontsize=9)
    if len(shots) > 1:
        ax.legend(fontsize=8, loc="lower right")
    low = min(s["accuracy"] - s["ci95"] for r in rows for s in r["seeds"])
    ax.set_ylim(max(0.0, low - 5), min(100.0, ax.get_ylim()[1] + 3))
    fig.tight_layout()
    fig.savefig(path)


def _bar(ax, x: float, width: float, row: dict, color: str, label: str | None) -> None:
    seeds = np.asarray([s["accuracy"] for s in row["seeds"]])  # (S,)
    err = row["std"] if row["std"] is not None else row["seeds"][0]["ci95"]
    ax.bar(x, row["mean"], width * 0.9, yerr=err, capsize=3, color=color, alpha=0.75,
           label=label)
    ax.scatter(np.full(len(seeds), x), seeds, s=9, color="black", zorder=3)
    if row["paired"] is not None:
        tests = [("ep", row["paired"]["episodes"]), ("seeds", row["paired"]["seeds"])]
        text = "\n".join(f"p {name} {format_p(t['p'])}" for name, t in tests if t is not None)
        top = max(row["mean"] + err, float(seeds.max()))  # above the error bar and every dot
        ax.annotate(text, (x, top),
                    xytext=(0, 3), textcoords="offset points", ha="center", fontsize=6)


def sweep_command(source: str, cfg: SweepConfig, *, heads: list[str] | None = None,
                  log=print) -> dict:
    """`python cli.py sweep`: the spec of a preset or file, the runs, the table and figure."""
    return run_sweep(load_spec(source, heads), cfg, log=log, draw=plot_sweep)
