"""`python cli.py analyze compare` (paper Fig. 9): the sorted per-class accuracy gain of one
evaluation report over another scored on the same episodes, with the paired overall gain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cache import UserError
from cache.atomic import write_json


def class_gains(acc_a: dict[str, float], acc_b: dict[str, float]) -> list[dict]:
    """Per-class accuracy of B minus A, largest gain first (ties by class name).

    Only classes in both reports are compared; the caller says which ones were left out.
    """
    shared = sorted(set(acc_a) & set(acc_b))
    rows = [{"class": c, "a": float(acc_a[c]), "b": float(acc_b[c]),
             "gain": float(acc_b[c]) - float(acc_a[c])} for c in shared]
    return sorted(rows, key=lambda r: (-r["gain"], r["class"]))


def plot_gains(gains: list[dict], path: Path, name_a: str, name_b: str) -> None:
    """Paper Fig. 9: one horizontal bar per class, sorted by gain, largest at the top."""
    height = max(2.5, 0.28 * len(gains) + 1.2)
    fig = Figure(figsize=(7.5, height), dpi=120)
    ax = fig.subplots()
    values = [g["gain"] for g in gains][::-1]  # percent points, as in the reports
    names = [g["class"] for g in gains][::-1]
    colors = ["tab:green" if v >= 0 else "tab:red" for v in values]
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), names, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"per-class accuracy gain (percent points): B - A\nA = {name_a}, B = {name_b}",
                  fontsize=9)
    ax.set_title(f"per-class gain of B over A, {len(gains)} classes, sorted", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


SAME_EPISODES_KEYS = ("split", "way", "shot", "queries", "episodes", "seed", "episodes_from")


def read_report(path: str) -> dict:
    """An `evaluate` JSON report, checked for what `compare` needs."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no report at {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not a JSON report ({e})") from None
    if not isinstance(report, dict) or "per_class_accuracy" not in report:
        raise UserError(f"{path} is not an evaluation report (no per_class_accuracy); write one "
                        f"with `python cli.py evaluate`")
    for key, values in (("per_class_accuracy", report["per_class_accuracy"]),
                        ("episode_accuracy", report.get("episode_accuracy") or [])):
        if isinstance(values, dict):
            values = list(values.values())
        if not isinstance(values, list) or not all(_number(v) for v in values):
            raise UserError(f"{path}: {key} must hold numbers (an edited or damaged report); "
                            "evaluate again to rewrite it")
    return report


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def episode_mismatch(a: dict, b: dict) -> list[str]:
    """Why two reports cannot have scored the same episodes ([] when nothing says so).

    Sampled episodes are a function of (cache rows, split, way, shot, queries, seed, count);
    replayed ones of the episode file, so the seed of a replay does not matter.
    """
    keys = [k for k in SAME_EPISODES_KEYS if not (k == "seed" and a.get("episodes_from"))]
    diffs = [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    path_a, path_b = (r.get("cache", {}).get("path") for r in (a, b))
    if not a.get("episodes_from") and path_a != path_b:
        diffs.append(f"cache {path_a!r} vs {path_b!r} (sampled episodes depend on the cache's "
                     f"rows; replay one --save-episodes file to compare across caches)")
    return diffs


def _report_name(report: dict, path: str) -> str:
    head = report.get("head") or {}
    kind = head.get("kind", "head")
    if head.get("kind") == "ta2n":
        off = [s for s in ("ttm", "tc", "sc") if head.get(s) is False]
        kind += f" (no {'/'.join(off).upper()})" if off else ""
    return f"{kind} [{Path(path).stem}]"


def run_compare(report_a: str, report_b: str, out_dir: str, top: int = 3,
                allow_different: bool = False) -> dict:
    """Per-class gain of report B over report A (same episodes); write compare.json and
    compare_gains.png into ``out_dir``. Returns the JSON payload."""
    a, b = read_report(report_a), read_report(report_b)
    mismatch = episode_mismatch(a, b)
    if mismatch and not allow_different:
        raise UserError("the reports were not made on the same episodes (" + "; ".join(mismatch)
                        + "); pass --allow-different-episodes to compare anyway")
    gains = class_gains(a["per_class_accuracy"], b["per_class_accuracy"])
    if not gains:
        raise UserError("the reports share no class")
    only = sorted(set(a["per_class_accuracy"]) ^ set(b["per_class_accuracy"]))
    name_a, name_b = _report_name(a, report_a), _report_name(b, report_b)
    paired = None
    ep_a, ep_b = a.get("episode_accuracy"), b.get("episode_accuracy")
    if not mismatch and ep_a and ep_b and len(ep_a) == len(ep_b):
        diff = np.asarray(ep_b, dtype=np.float64) - np.asarray(ep_a, dtype=np.float64)
        paired = {"gain": float(diff.mean()),
                  "ci95": float(1.96 * diff.std() / np.sqrt(len(diff)))}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "compare.json", "figure": out / "compare_gains.png"}
    plot_gains(gains, files["figure"], name_a, name_b)
    summary = {
        "report_a": {"path": str(report_a), "name": name_a, "accuracy": a.get("accuracy"),
                     "ci95": a.get("ci95")},
        "report_b": {"path": str(report_b), "name": name_b, "accuracy": b.get("accuracy"),
                     "ci95": b.get("ci95")},
        "units": "percent (as in the evaluation reports)",
        "same_episodes": not mismatch,
        "mismatch": mismatch,
        "paired_episode_gain": paired,
        "classes": gains,
        "top_gains": [g["class"] for g in gains[:top]],
        "only_in_one_report": only,
        "files": {k: str(v) for k, v in files.items()},
    }
    write_json(files["json"], summary)
    return summary


def format_compare(summary: dict) -> str:
    """What `analyze compare` prints: overall accuracies, the per-class table, the top gains."""
    a, b = summary["report_a"], summary["report_b"]
    lines = []
    if summary["mismatch"]:
        lines.append("warning    NOT the same episodes: " + "; ".join(summary["mismatch"]))
    lines += [f"A          {a['name']}: {a['accuracy']:.2f} +- {a['ci95']:.2f}",
              f"B          {b['name']}: {b['accuracy']:.2f} +- {b['ci95']:.2f}"]
    if summary["paired_episode_gain"]:
        p = summary["paired_episode_gain"]
        lines.append(f"B - A      {p['gain']:+.2f} +- {p['ci95']:.2f} points (paired over the "
                     f"same episodes)")
    width = max(len("class"), *(len(g["class"]) for g in summary["classes"]))
    lines.append(f"{'class':<{width}}  {'A':>7}  {'B':>7}  {'gain':>7}")
    for g in summary["classes"]:
        lines.append(f"{g['class']:<{width}}  {g['a']:7.2f}  {g['b']:7.2f}  {g['gain']:+7.2f}")
    if summary["only_in_one_report"]:
        lines.append(f"left out   classes in only one report: "
                     f"{', '.join(summary['only_in_one_report'])}")
    lines.append(f"most gain  {', '.join(summary['top_gains'])}")
    lines.append("wrote      " + ", ".join(summary["files"].values()))
    return "\n".join(lines)
