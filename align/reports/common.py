"""What every report shares: where a report writes when no --out is given."""

from __future__ import annotations

from pathlib import Path


def default_out(path: str) -> str:
    """Where `analyze` writes when no --out is given: runs/analyze-<cache or report name>."""
    return str(Path("runs") / f"analyze-{Path(str(path).rstrip('/')).stem}")
