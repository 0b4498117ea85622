"""bench/extract_stages.py at its test size: every stage is measured on the same videos as the
whole pipeline, and the figures it reports hang together."""

import json
import subprocess
import sys

import pytest
from bench_testing import BENCH


@pytest.mark.slow
def test_stage_bench_reports_every_stage_the_bound_and_the_shares(tmp_path):
    out = tmp_path / "stages.json"
    result = subprocess.run([sys.executable, str(BENCH / "extract_stages.py"), "--small",
                             "--baseline", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "<- bounds" in result.stdout and "before issue 26" in result.stdout
    (setup,) = json.loads(out.read_text())["setups"]
    rates = setup["stage_frames_per_s"]
    assert set(rates) == {"decode", "backbone", "write"} and min(rates.values()) > 0
    assert setup["bound_by"] == min(rates, key=rates.get)
    serial = 1 / sum(1 / r for r in rates.values())
    assert setup["serial_bound_frames_per_s"] == pytest.approx(serial, rel=0.01)
    assert setup["share_of_serial"] == pytest.approx(
        setup["pipeline_frames_per_s"] / serial, rel=0.01)
    assert setup["goal"] == {"of": "serial", "at_least": 0.9, "share": setup["share_of_serial"]}
    assert setup["codec"] == "zstd" and setup["before_issue_26"]["frames_per_s"] > 0
