"""The cache extract writes into: its attributes (what made every row, the fingerprint a resume
must match), creating it, opening it again to resume, the wait of ranks > 0 for it, and its error
reports.

A cache made with other backbone, weights, preprocessing, pooling, frames, image size, resize,
views, dtype or selection of videos, or from split lists that changed since (a line removed or
added, a video moved to another split: named in the message), is refused unless ``overwrite``; a
store whose creation by extract was interrupted is created again; ``overwrite`` replaces only a
cache of this tool.

Under W > 1 processes rank 0 creates the cache; the others wait (up to ``wait_timeout``) until it
is complete. Rows and done flags are separate chunks, so writers never touch the same object.
Error reports: one process writes attr ``errors`` = {"missing": [...], "failed": [{video,
reason}]}; under W > 1 processes rank k writes its failures to ``errors_rank<k>`` instead (a key of
its own, written on a freshly opened group and checked again after a pause, since every attribute
write rewrites the whole attribute object). ``read_errors`` merges them and drops failures whose
row is done by now.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cache import FeatureCache, UserError
from cache.errors import CacheInUse, NotACache
from cache.store import inspect_path
from extract.backbones import Backbone
from extract.datasets import VideoList, dataset_spec, explain_missing
from extract.plan import ExtractConfig, Shard

SAMPLING = "tsn-centre"
_STARTED = datetime.now(UTC)
# Attributes that decide a row's content: a cache is resumed only if they all agree.
FINGERPRINT = ("dataset", "backbone", "weights_state_sha256", "frames", "image_size", "resize",
               "aug_views", "aug_seed", "aug_flip", "dtype", "sampling", "selection", "mean",
               "std", "interpolation", "pool_to", "store_dtype")
# What caches written before these attributes existed used (their backbones were all ResNets).
LEGACY = {"interpolation": "bilinear"}


def code_version() -> str:
    """Package version, plus ``git describe`` when the code runs from a git checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("ta2n-cache")
    except PackageNotFoundError:
        release = "unknown"
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return release
    return f"{release}+{described}" if described else release


def build_attrs(config: ExtractConfig, backbone: Backbone, found: VideoList) -> dict:
    flip = dataset_spec(config.dataset).flip
    prep = backbone.preprocessing
    weights_attrs = backbone.weights.to_attrs()
    return {
        "dataset": config.dataset,
        "backbone": config.backbone,
        "backbone_info": {**backbone.spec.to_attrs(), "channels": backbone.grid[0],
                          "grid": list(backbone.grid[1:])},
        "weights": weights_attrs,
        "weights_state_sha256": weights_attrs["state_sha256"],
        "frames": config.frames,
        "dtype": config.dtype,
        "store_dtype": config.store_dtype,
        "aug_views": config.aug_views,
        "image_size": config.image_size,
        "resize": config.resize,
        "sampling": SAMPLING,
        "mean": list(prep.mean),
        "std": list(prep.std),
        "interpolation": prep.interpolation,
        "preprocessing": {**prep.to_attrs(), "image_size": config.image_size,
                          "resize": config.resize, "resize_shape": "square (frame squashed)",
                          "crop": "centre"},
        "grid": list(backbone.grid[1:]),
        "pool_to": config.pool_to,
        "aug_seed": config.seed if config.aug_views else None,
        "aug_flip": flip if config.aug_views else None,
        "augmentation": {"views": config.aug_views, "seed": config.seed, "flip": flip,
                         "frames": "random frame per segment", "crop": "random"},
        "selection": {"splits": list(config.splits), "limit": config.limit},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "extract_config": json.loads(json.dumps(asdict(config))),
        "errors": {"missing": list(found.missing), "failed": []},
    }


def _jsonable(value):
    return json.loads(json.dumps(value))


def fingerprint_mismatch(existing: dict, wanted: dict) -> list[str]:
    """Fingerprint attributes that differ, as 'name: cache X, this run Y'."""
    return [f"{key}: cache {existing.get(key, LEGACY.get(key))!r}, this run {wanted[key]!r}"
            for key in FINGERPRINT
            if existing.get(key, LEGACY.get(key)) != _jsonable(wanted[key])]


def read_errors(cache: FeatureCache) -> dict:
    """The merged error report: missing videos and failures of rows that are still not done."""
    attrs = cache.attrs
    report = attrs.get("errors") or {}
    done_ids = set(cache.video_ids[cache.done].tolist()) if len(cache) else set()
    failed: dict[str, str] = {}
    keys = sorted(k for k in attrs if k.startswith("errors_rank")) + ["errors"]
    for key in keys:  # a video failed in several reports keeps one reason
        for item in (attrs.get(key) or {}).get("failed", []):
            if item["video"] not in done_ids:
                failed[item["video"]] = item["reason"]
    return {"missing": list(report.get("missing", [])),
            "failed": [{"video": v, "reason": r} for v, r in sorted(failed.items())]}


def _create(config: ExtractConfig, found: VideoList, attrs: dict, shape) -> FeatureCache:
    if not found.records:
        raise UserError(
            f"no video of the {'/'.join(config.splits)} split lists was found under "
            f"{config.root} ({len(found.missing)} listed; "
            f"{explain_missing(config.dataset, config.root, found.missing)}); check --root")
    cache = FeatureCache.create(
        config.out, video_ids=[r.video_id for r in found.records],
        splits=[r.split for r in found.records], labels=[r.label for r in found.records],
        classes=found.classes, shape=shape, dtype=config.dtype, aug_views=config.aug_views,
        attrs=attrs, backend=config.backend, overwrite=True, codec=config.codec,
        store_dtype=config.store_dtype)
    cache.update_attrs(extract_ready=True)  # the mark other ranks wait for
    return cache


def _open_existing(config: ExtractConfig) -> FeatureCache | None:
    """The cache at ``config.out`` opened for writing; None if there is none yet, or only one
    whose creation by extract was interrupted (nothing in it is worth keeping)."""
    found = inspect_path(config.out, config.backend)
    if found.state in ("absent", "empty"):
        return None
    if found.state == "other":
        raise NotACache(f"{config.out} exists and is not a feature cache ({found.reason}); it is "
                        "never replaced: choose another --out")
    if not found.attrs.get("extract_ready"):
        if "extract_config" in found.attrs:
            return None  # created by an extract that was killed before it was ready
        raise UserError(f"{config.out} holds a cache that extract did not make (dataset "
                        f"{found.attrs.get('dataset')!r}); pass --overwrite to replace it, or "
                        "choose another --out")
    try:
        return FeatureCache.open(config.out, mode="r+", backend=config.backend)
    except (CacheInUse, NotACache):
        raise
    except UserError as e:  # a damaged cache of this tool: --overwrite may replace it
        raise UserError(f"{e.message}; pass --overwrite to replace it") from None


def _run_token() -> str | None:
    """torchrun's id of this launch (the same on every rank), if there is one."""
    token = os.environ.get("TORCHELASTIC_RUN_ID")
    return token if token and token != "none" else None


def _made_by_this_launch(attrs: dict) -> bool:
    """Whether a cache was (re)created by this launch's rank 0: same torchrun id, or else
    created after this process started (less a margin for clocks and start-up order)."""
    token = _run_token()
    if token:
        return attrs.get("run_id") == token
    return attrs.get("created", "") >= (_STARTED - timedelta(minutes=5)).isoformat(
        timespec="seconds")


def open_cache(config: ExtractConfig, shard: Shard, found: VideoList, attrs: dict,
               shape: tuple[int, int, int, int]) -> FeatureCache:
    """Rank 0 creates or resumes the cache; other ranks wait until it is there and matches."""
    attrs = {**attrs, "run_id": _run_token()}
    if shard.rank == 0:
        cache = None if config.overwrite else _open_existing(config)
        if cache is None:
            return _create(config, found, attrs, shape)
        problems = fingerprint_mismatch(cache.attrs, attrs)
        if problems:
            cache.close()
            raise UserError(f"{config.out} was extracted with other settings "
                            f"({'; '.join(problems)}); pass --overwrite to replace it, "
                            "or --out to write elsewhere")
        changes = found.changes_from(cache.video_ids, cache.splits)
        if changes:  # its rows would not be the videos the lists name now
            cache.close()
            raise UserError(f"{config.out}: the split lists changed since it was extracted "
                            f"({'; '.join(changes)}); pass --overwrite to extract it again "
                            "from the new lists, or --out to write elsewhere")
        return cache
    deadline = time.monotonic() + config.wait_timeout
    while True:
        try:
            cache = _open_existing(config)
        except UserError:
            cache = None  # rank 0 may be creating it right now
        if cache is not None:
            problems = fingerprint_mismatch(cache.attrs, attrs)
            if not problems and (not config.overwrite or _made_by_this_launch(cache.attrs)):
                return cache
            cache.close()
            if problems and not config.overwrite:
                raise UserError(f"{config.out} was extracted with other settings "
                                f"({'; '.join(problems)}); rank 0 will refuse it too")
        if time.monotonic() > deadline:
            raise UserError(f"rank {shard.rank}: no complete cache appeared at {config.out} "
                            f"within {config.wait_timeout:g} s; is rank 0 running?")
        time.sleep(1.0)


def write_rank_errors(config: ExtractConfig, shard: Shard, report: dict, tries: int = 5) -> None:
    """Store this rank's failures under its own key, surviving other ranks' attribute writes."""
    key = f"errors_rank{shard.rank}"
    for _ in range(tries):
        with FeatureCache.open(config.out, mode="r+", backend=config.backend) as cache:
            cache.update_attrs(**{key: report})
        time.sleep(1.0 + 0.1 * shard.rank)  # another rank's stale rewrite lands within this pause
        with FeatureCache.open(config.out, backend=config.backend) as cache:
            if cache.attrs.get(key) == _jsonable(report):
                return
