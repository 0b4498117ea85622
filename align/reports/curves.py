"""A run's training curves (its metrics.csv): loss and train / validation accuracy per epoch."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display is ever needed

import matplotlib.pyplot as plt  # noqa: E402

from align.runs import read_metrics  # noqa: E402
from cache import UserError  # noqa: E402

DPI = 100
CURVES_SIZE = (1000, 380)  # (width, height) in pixels of training_curves.png


def plot_training_curves(metrics_csv: str | os.PathLike, path: str | os.PathLike,
                         chance: float | None = None) -> Path:
    """Loss and train / val accuracy per epoch of a run (its metrics.csv) as a PNG; ``chance``
    (percent) draws the chance level of the episodes."""
    rows = read_metrics(metrics_csv)
    if not rows:
        raise UserError(f"{metrics_csv} holds no epochs yet")
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(CURVES_SIZE[0] / DPI,
                                                         CURVES_SIZE[1] / DPI), dpi=DPI)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", color="#444444", ms=4)
    ax_loss.set(xlabel="epoch", ylabel="loss per episode",
                title="training loss (cross-entropy summed over the queries)")
    ax_acc.plot(epochs, [r["train_acc"] for r in rows], "o-", ms=4, label="train (episodes)")
    val = [(r["epoch"], r["val_acc"], r.get("val_ci95") or 0.0) for r in rows
           if r.get("val_acc") is not None]
    if val:
        x, y, ci = zip(*val)
        ax_acc.errorbar(x, y, yerr=ci, fmt="s-", ms=4, capsize=3, label="val (95% CI)")
    if chance is not None:
        ax_acc.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.0f}%)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="episode accuracy")
    ax_acc.legend(fontsize=8, loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if len(epochs) < 15:
            ax.set_xticks(epochs)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.14, top=0.9, wspace=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
