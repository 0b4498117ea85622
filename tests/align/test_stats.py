"""The paired test against known answers: Student's sleep data and a closed form."""

import math

import numpy as np
import pytest

from align.stats import format_p, paired_test, seed_spread

# Cushny & Peebles' sleep data as Student (1908) used it: extra hours of sleep of 10 patients
# under two drugs. R's `t.test(extra ~ group, data = sleep, paired = TRUE)` reports
# t = -4.0621, df = 9, p-value = 0.002833, 95% CI of the mean difference (-2.4599, -0.7001).
DRUG_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_sleep_data_matches_the_published_paired_t_test():
    # B = drug 1, A = drug 2, so the gain is drug 1 minus drug 2, as in R's output
    result = paired_test(DRUG_2, DRUG_1)
    assert result["gain"] == pytest.approx(-1.58)
    assert result["t"] == pytest.approx(-4.0621, abs=1e-4)
    assert result["p"] == pytest.approx(0.002833, abs=1e-6)
    assert result["ci_low"] == pytest.approx(-2.4598858, abs=1e-6)
    assert result["ci_high"] == pytest.approx(-0.7001142, abs=1e-6)
    assert result["n"] == 10


def test_two_degrees_of_freedom_match_the_closed_form():
    """With 3 pairs (df = 2) the t distribution has a closed form: two-sided
    p = 1 - t / sqrt(2 + t^2). Differences 1, 2, 3: mean 2, sd 1, t = 2 sqrt(3)."""
    result = paired_test([5.0, 5.0, 5.0], [6.0, 7.0, 8.0])
    t = 2 * math.sqrt(3)
    assert result["t"] == pytest.approx(t)
    assert result["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    # the 95% interval is mean +- t_{0.975, 2} sd / sqrt(3), t_{0.975, 2} = 4.302653
    half = 4.302653 / math.sqrt(3)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((2 - half, 2 + half), abs=1e-5)


def test_pairing_finds_a_gain_that_overlapping_intervals_hide():
    """Episode difficulty shared by both heads: unpaired intervals overlap, the pairs do not."""
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(20, 100, size=200)  # (E,)
    a = difficulty
    b = difficulty + 1.0 + rng.normal(0, 0.5, size=200)
    ci_a = 1.96 * a.std() / math.sqrt(len(a))
    assert abs(b.mean() - a.mean()) < 2 * ci_a  # the two 95% intervals overlap
    assert paired_test(a, b)["p"] < 1e-10


def test_degenerate_differences_and_bad_input():
    same = paired_test([50.0, 60.0, 70.0], [50.0, 60.0, 70.0])
    assert (same["gain"], same["p"], same["t"]) == (0.0, 1.0, None)
    shifted = paired_test([50.0, 60.0, 70.0], [52.0, 62.0, 72.0])
    assert (shifted["gain"], shifted["p"]) == (2.0, 0.0)
    with pytest.raises(ValueError):
        paired_test([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        paired_test([1.0], [2.0])


def test_seed_spread_and_p_format():
    assert seed_spread([40.0, 42.0, 44.0]) == (42.0, 2.0)  # sample std, ddof = 1
    assert seed_spread([40.0]) == (40.0, None)
    assert format_p(0.31234) == "0.31" and format_p(3e-5) == "< 0.0001"
