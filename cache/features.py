"""What features a cache holds, as a fingerprint that checkpoints, runs and reports record.

Two caches of the same (C, T, H, W) can hold unrelated features (another backbone, other weights,
another crop): a head trained on one scores garbage on the other, with no error. The fingerprint
is what decides the features - backbone, the sha256 of the loaded weights, preprocessing
(image size, resize, mean, std, interpolation), T and the frame sampling, pooling, and for a
synthetic cache its generator's settings - taken from the cache's attributes. What does not
change the features (the dataset, the date, the path, the row count) is left out, so a head may
be scored on another dataset's cache of the same backbone.

``feature_fingerprint(attrs, path)`` computes it; ``check_same_features(recorded, current)`` is
the one check every command that puts a head on a cache runs (evaluate, visualize, analyze
embedding, train-heads --resume; classify too): it refuses other features in one line naming
both caches, or with ``allow_other`` returns a loud warning for the caller to print and record.
"""

from __future__ import annotations

import hashlib
import json

from cache.errors import UserError

# The attributes (written by extract; see README "The feature cache") that decide the features.
FEATURE_KEYS = ("backbone", "weights_state_sha256", "frames", "sampling", "image_size",
                "resize", "mean", "std", "interpolation", "pool_to", "grid")
SYNTHETIC_PER_ROW = ("windows", "positions", "exponents")  # ground truth, not settings


def feature_fingerprint(attrs: dict, path: str) -> dict:
    """{"cache": path, "features": {the deciding attributes}, "digest": sha256 of them (16 hex)}.

    Keys a cache does not record are left out (an older cache, another program's): the digest
    then covers what it does record. Without ``weights_state_sha256`` (caches from before it)
    the ``weights`` description stands in for it.
    """
    features = {key: attrs[key] for key in FEATURE_KEYS if key in attrs}
    if "weights_state_sha256" not in attrs and "weights" in attrs:
        features["weights"] = attrs["weights"]
    synthetic = attrs.get("synthetic")
    if isinstance(synthetic, dict):  # the generator is the synthetic cache's "backbone"
        features["synthetic"] = {k: v for k, v in synthetic.items()
                                 if k not in SYNTHETIC_PER_ROW}
    canonical = json.dumps(features, sort_keys=True, default=str)
    return {"cache": str(path), "features": features,
            "digest": hashlib.sha256(canonical.encode()).hexdigest()[:16]}


def differences(recorded: dict, current: dict) -> list[str]:
    """'key: A vs B' for every deciding attribute that differs (missing on one side included);
    nested settings are named by their path (synthetic.config.seed)."""
    a, b = _flat(recorded.get("features", {})), _flat(current.get("features", {}))
    return [f"{key}: {_short(a.get(key))} vs {_short(b.get(key))}"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if value is not None else "(not recorded)"
    return text if len(text) <= 40 else text[:37] + "..."


def check_same_features(recorded: dict | None, current: dict, *, what: str,
                        allow_other: bool = False,
                        remedy: str = "pass --allow-other-features to score it anyway"
                        ) -> str | None:
    """None when ``current`` holds the features ``recorded`` was trained on; else refuse in one
    line, or with ``allow_other`` return a warning the caller prints and records.

    ``recorded`` None (a checkpoint made before fingerprints, or the authors' file) cannot be
    checked: a warning says so.
    """
    if not recorded:
        return (f"warning: {what} records no feature fingerprint (made before they were "
                f"recorded, or by other code): cannot check that {current['cache']} holds the "
                "features it was trained on")
    if recorded.get("digest") == current.get("digest"):
        return None
    diff = "; ".join(differences(recorded, current)[:4]) or "digest differs"
    detail = (f"{what} was trained on the features of {recorded.get('cache')} (fingerprint "
              f"{recorded.get('digest')}), but {current['cache']} holds other features "
              f"(fingerprint {current['digest']}: {diff})")
    if allow_other:
        return f"WARNING: {detail}; scoring anyway (--allow-other-features)"
    raise UserError(f"{detail}; its scores there would mean nothing: use a cache extracted "
                    f"with the same settings, or {remedy}")
