"""The one table of bench/gpu_all.sh, from the JSON each part wrote into OUT (and its exit status).

    python bench/gpu_table.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def status(out: Path, name: str) -> str:
    rc = (out / f"{name}.rc").read_text().strip() if (out / f"{name}.rc").exists() else "?"
    return {"0": "ok", "124": "timed out"}.get(rc, f"failed (exit {rc}, see {name}.log)")


def rows(out: Path) -> list[tuple[str, str, str]]:
    table = []
    ex = read(out, "extract")
    if ex:
        table += [
            ("extraction, bare backbone", f"{ex['bare_frames_per_s']:.0f} frames/s",
             f"{ex['backbone']} {ex['image_size']} px, batch {ex['batch']}"),
            ("extraction, whole pipeline", f"{ex['pipeline_frames_per_s']:.0f} frames/s",
             f"{ex['videos']} videos, {ex['workers']} decode workers"),
            ("pipeline / bare", f"{ex['ratio']:.3f}", "goal >= 0.9"),
        ]
    else:
        table.append(("extraction", status(out, "extract"), ""))
    dec = read(out, "extract_gpudec")
    if dec:
        table.append((f"extraction, whole pipeline, --decoder {dec['decoder']}",
                      f"{dec['pipeline_frames_per_s']:.0f} frames/s: {dec['ratio']:.3f} of bare",
                      f"{dec['fallbacks']} videos fell back to the CPU decoders, "
                      f"{dec['failed']} failed"))
    else:
        table.append(("extraction, --decoder gpu", status(out, "extract_gpudec"), ""))
    stages = read(out, "stages")
    for setup in (stages or {}).get("setups", []):
        rates = setup["stage_frames_per_s"]
        table.append((f"extraction stages, {setup['setup']}",
                      ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + " frames/s",
                      f"bound by {setup['bound_by']}; {setup['videos']} videos, "
                      f"{setup['workers']} decode workers, {setup['writers']} writers, codec "
                      f"{setup['codec']}"))
        goal = setup["goal"]
        table.append((f"pipeline / {goal['of']}, {setup['setup']}",
                      f"{setup['pipeline_frames_per_s']:.0f} frames/s: {goal['share']:.3f}",
                      f"goal >= {goal['at_least']}"
                      + (f"; before issue 26 {setup['before_issue_26']['frames_per_s']:.0f} "
                         f"frames/s" if "before_issue_26" in setup else "")))
    if stages is None:
        table.append(("extraction stages", status(out, "stages"), ""))
    speed = read(out, "speed")
    if speed:
        for r in speed:
            k = r["shot"]
            table += [
                (f"training, 5-way {k}-shot", f"{r['train_episodes_per_s']:.1f} episodes/s",
                 f"{r['train_episode_gflop']:.0f} GFLOP/episode, "
                 f"{r['achieved_train_tflops']:.1f} TFLOP/s achieved"),
                (f"evaluation, 5-way {k}-shot", f"{r['eval_episodes_per_s']:.0f} episodes/s",
                 f"5000 episodes: {5000 / r['eval_episodes_per_s']:.1f} s"),
                (f"paper-length UCF101 run, {k}-shot (projected from the measured rates)",
                 f"{60 * r['paper_run_here_h']:.1f} min",
                 "200 x 200 training episodes, val every 5 epochs, 5000 test episodes"),
            ]
    else:
        table.append(("training / evaluation", status(out, "speed"), ""))
    return table


def main() -> None:
    out = Path(sys.argv[1])
    machine = read(out, "machine") or {}
    where = machine.get("gpu") or "CPU (dry run)"
    lines = [f"Measured on {where}, torch {machine.get('torch')}, "
             f"Python {machine.get('python')}, {machine.get('cpus')} CPU cores", "",
             "| what | measured | setting |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows(out)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
