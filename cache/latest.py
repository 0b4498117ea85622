"""Remembers the most recently written cache, so that `train-heads` works with no arguments.

`extract` (and `synth`) call ``remember_cache`` when they finish; every command that reads a cache
(train-heads, evaluate, sweep, analyze) calls ``resolve_cache`` when no ``--cache`` is given: the
one place the latest cache is looked up and announced. The record is a small JSON file,
``caches/latest.json`` under the working directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from cache.atomic import write_json
from cache.errors import UserError

LATEST_FILE = Path("caches") / "latest.json"


def default_cache_path(dataset: str, backend: str = "zarr") -> str:
    """Where `extract --dataset D` writes unless told otherwise."""
    return str(Path("caches") / f"{dataset}.{'h5' if backend == 'hdf5' else 'zarr'}")


def remember_cache(path: str, dataset: str) -> None:
    write_json(LATEST_FILE, {"path": str(path), "dataset": dataset})


def latest_cache() -> tuple[str, str]:
    """(path, dataset) of the most recently extracted cache."""
    if not LATEST_FILE.exists():
        raise UserError(
            "no cache given and none extracted yet: run `python cli.py extract --dataset D` "
            "first, or pass --cache PATH"
        )
    record = json.loads(LATEST_FILE.read_text())
    return record["path"], record["dataset"]


def resolve_cache(path: str | None, log: Callable[[str], None], label: str = "cache  ") -> str:
    """``path`` if given, else the most recently extracted cache, announced through ``log`` as
    "<label><path> (the most recently written one, <dataset>)"; refused in one line when there
    is none (``latest_cache``)."""
    if path is not None:
        return path
    path, dataset = latest_cache()
    log(f"{label}{path} (the most recently written one, {dataset})")
    return path
