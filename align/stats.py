"""Statistics for comparing runs: the spread over seeds, and the paired tests of two heads scored
on the same episodes (``sweep``'s "vs" columns).

Two heads scored on identical episodes are compared episode by episode: a two-sided paired
t-test (``scipy.stats.ttest_rel``) on the per-episode accuracies, with the t-interval of the
mean difference. Pairing removes the episode-to-episode difficulty that both heads share, which
two overlapping 95% intervals cannot: "+0.4 points, p = 0.31" instead of two intervals. That test
treats the trained heads as fixed; whether a gain survives retraining with another seed is the
same test on the per-seed accuracies (paired by seed, which fixes the episodes too).
"""

from __future__ import annotations

import warnings

import numpy as np

PAIRED_EPISODES = ("two-sided paired t-test (scipy.stats.ttest_rel) on the per-episode "
                   "accuracies, every seed's episodes pooled (training-seed variance not "
                   "included: do these trained heads differ on this task distribution?)")
PAIRED_SEEDS = ("two-sided paired t-test (scipy.stats.ttest_rel) on the per-seed accuracies, "
                "df = seeds - 1 (does the gain hold across training seeds?)")


def paired_test(a, b, confidence: float = 0.95) -> dict:
    """B against A on the same episodes: mean gain of B over A (same units as the inputs), its
    ``confidence`` t-interval, t, the two-sided p-value and the number of pairs.

    Identical arrays give gain 0 and p = 1 (scipy's t is 0/0 there); a constant non-zero
    difference gives p = 0 (no variance: no doubt).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"a paired test needs two 1-D arrays of the same length >= 2, "
                         f"got {a.shape} and {b.shape}")
    diff = b - a  # (n,)
    gain = float(diff.mean())
    if np.all(diff == diff[0]):
        return {"gain": gain, "ci_low": gain, "ci_high": gain, "t": None,
                "p": 1.0 if gain == 0 else 0.0, "n": len(diff)}
    # scipy.stats takes about a second to import: only here, so that the CLI, which imports
    # the sweep's config at start-up to generate its options, does not pay for it
    from scipy import stats

    with warnings.catch_warnings():  # near-constant differences: scipy warns, the answer stands
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_rel(b, a)
        interval = result.confidence_interval(confidence)
    return {"gain": gain, "ci_low": float(interval.low), "ci_high": float(interval.high),
            "t": float(result.statistic), "p": float(result.pvalue), "n": len(diff)}


def seed_spread(values) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1) over seeds; None for a single seed."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None


def format_p(p: float) -> str:
    """p for a table: two significant digits, ``< 0.0001`` below that."""
    return "< 0.0001" if p < 1e-4 else f"{p:.2g}"
