"""bench/gpu_all.sh's dry run: the GPU script's code paths on tiny inputs on the CPU, so the
script is known to work before scarce GPU time is spent on it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_script_dry_run_prints_every_row(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_all.sh"), "--dry-run"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    for row in ("extraction, bare backbone", "pipeline / bare",
                "extraction, whole pipeline, --decoder cpu", "extraction stages, resnet18@64",
                "pipeline / serial, resnet18@64", "training, 5-way 1-shot",
                "evaluation, 5-way 5-shot", "paper-length UCF101 run, 5-shot"):
        assert f"| {row}" in table, table
    assert [(tmp_path / f"{part}.rc").read_text().strip()
            for part in ("extract", "extract_gpudec", "stages", "speed")] == ["0"] * 4
