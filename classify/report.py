"""What classify writes and prints: the predictions CSV (and JSON), the console table and
summary, accuracy / per-class accuracy / confusion matrix when query labels are known, and one
alignment figure per query (as `visualize` draws them).

CSV columns: query, predicted, probability, runner_up, margin, p_<class> (one per support class,
in the support folder's order), status ("ok" or "failed: <why>"), true_class (empty when not
known), in_support (the query is the same clip as a support clip).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from align.reports.pairs import draw_pair, wrap_class
from cache.atomic import atomic_path, write_json
from classify.api import FewShotClassifier, Prediction


def csv_columns(classes: list[str]) -> list[str]:
    return ["query", "predicted", "probability", "runner_up", "margin",
            *[f"p_{c}" for c in classes], "status", "true_class", "in_support"]


def _round(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def write_csv(path: str | os.PathLike, predictions: list[Prediction], classes: list[str]) -> None:
    """The predictions as CSV (atomically: a kill never leaves half a file)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(csv_columns(classes))
        for p in predictions:
            writer.writerow([p.query, p.label or "", _round(p.probability), p.runner_up or "",
                             _round(p.margin),
                             *[_round(p.probabilities.get(c)) if p.ok else "" for c in classes],
                             p.status, p.truth or "", int(p.in_support)])


def accuracy(predictions: list[Prediction], classes: list[str]) -> dict | None:
    """Accuracy (percent), per-class accuracy and confusion matrix over the readable queries
    whose class is known; None when there are none."""
    known = [p for p in predictions if p.ok and p.truth is not None]
    if not known:
        return None
    index = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for p in known:
        confusion[index[p.truth], index[p.label]] += 1
    per_class = {c: round(100.0 * confusion[i, i] / confusion[i].sum(), 2)
                 for i, c in enumerate(classes) if confusion[i].sum()}
    return {"accuracy": round(100.0 * float(np.mean([p.correct for p in known])), 2),
            "queries": len(known), "per_class_accuracy": per_class,
            "confusion": {"classes": classes, "matrix": confusion.tolist(),
                          "note": "rows: true class, columns: predicted class"}}


def format_table(predictions: list[Prediction], show: int = 10) -> str:
    """The first ``show`` predictions as a table."""
    lines = [f"  {'query':<40} {'predicted':<20} {'prob':>6} {'margin':>6}  status"]
    for p in predictions[:show]:
        name = p.query if len(p.query) <= 40 else "..." + p.query[-37:]
        prob = f"{p.probability:6.3f}" if p.ok else f"{'':6}"
        margin = f"{p.margin:6.3f}" if p.ok and p.margin is not None else f"{'':6}"
        mark = "" if p.truth is None or not p.ok else ("  right" if p.correct else
                                                        f"  wrong (is {p.truth})")
        lines.append(f"  {name:<40} {(p.label or '-'):<20} {prob} {margin}  "
                     f"{'ok' if p.ok else p.status}{mark}")
    if len(predictions) > show:
        lines.append(f"  ... {len(predictions) - show} more rows in the CSV")
    return "\n".join(lines)


def format_accuracy(result: dict) -> str:
    classes = result["confusion"]["classes"]
    width = max(6, *(len(c) for c in classes))
    lines = [f"accuracy   {result['accuracy']:.2f} % of {result['queries']} queries with a known "
             "class"]
    lines += [f"  {c:<{width}} {a:6.2f} %" for c, a in result["per_class_accuracy"].items()]
    lines.append(f"confusion (rows: true, columns: predicted)\n  {'':<{width}} "
                 + " ".join(f"{i:>4}" for i in range(len(classes))))
    for i, (c, row) in enumerate(zip(classes, result["confusion"]["matrix"])):
        lines.append(f"  {c:<{width}} " + " ".join(f"{v:>4}" for v in row) + f"   ({i})")
    return "\n".join(lines)


def draw_figures(clf: FewShotClassifier, predictions: list[Prediction], out: str | os.PathLike,
                 progress: bool = True, limit: int | None = None) -> list[dict]:
    """One figure per readable query (the first ``limit`` ones): the query against its
    predicted class's support clip (TTM windows, SC boxes, TC attention for TA2N; frames only
    for other heads)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    shown = [p for p in predictions if p.ok][:limit]
    for i, p in enumerate(tqdm(shown, desc="figures", unit="fig", disable=not progress)):
        why = clf.explain(p.query, p.label)
        info, support = why["record"], why["support_clip"]
        verdict = "" if p.truth is None else (" (right)" if p.correct else f" (is {p.truth})")
        title = (f"query {p.query}\npredicted {p.label}{verdict}, probability "
                 f"{p.probability:.2f}; support clip {support}")
        path = draw_pair(
            out / f"q{i:03d}_{Path(p.query).stem}.png",
            support_frames=clf.frames(support), query_frames=clf.frames(p.query),
            support_theta=info["ttm_support"][0] if "ttm_support" in info else None,
            query_theta=info["ttm_query"][0] if "ttm_query" in info else None,
            offsets=info["sc_offsets"][0, 0] if "sc_offsets" in info else None,
            attention=info["tc_attention"][0, 0] if "tc_attention" in info else None,
            map_hw=why["map_hw"], title=title,
            support_label=f"support\n{wrap_class(p.label)}", query_label="query")
        records.append({"query": p.query, "predicted": p.label, "truth": p.truth,
                        "correct": p.correct, "support": support, "path": str(path)})
    write_json(out / "index.json", {"figures": records})
    return records


def summary_lines(predictions: list[Prediction], clf: FewShotClassifier) -> list[str]:
    """The summary the command ends with."""
    failed = [p for p in predictions if not p.ok]
    shots = ", ".join(f"{c} {len(v)}" for c, v in clf.support_paths.items())
    lines = [f"{len(predictions)} queries: {len(predictions) - len(failed)} classified, "
             f"{len(failed)} failed (rows marked failed in the CSV)",
             f"support    {len(clf.classes)} classes, clips per class: {shots}; head "
             f"{clf.head.kind} (K rule {clf.head.shot_rule!r}"
             + (f", trained with K = {clf.head.shot})" if clf.head.trainable else ")"),
             f"clips      {clf.encoder.computed} decoded for {clf.encoder.recipe['backbone']}, "
             f"{clf.encoder.reused} found in --features"]
    lines += [f"  failed   {p.query}: {p.status[len('failed: '):]}" for p in failed[:10]]
    same = [p for p in predictions if p.in_support]
    if same:
        lines.append(f"warning    {len(same)} queries are support clips too (e.g. "
                     f"{same[0].query}): their predictions prove nothing")
    return lines
