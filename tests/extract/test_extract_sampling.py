"""TSN sampling: the centre frame rule, segment-bound random frames, seeded views."""

import math

import numpy as np
import pytest

from extract.sampling import centre_indices, plan_views, random_indices, segment_bounds


@pytest.mark.parametrize("n", [1, 3, 5, 8, 24, 30, 37, 40, 301])
@pytest.mark.parametrize("frames", [1, 4, 8, 16])
def test_centre_indices_follow_the_formula(n, frames):
    expected = [math.floor((t + 0.5) * n / frames) for t in range(frames)]
    assert centre_indices(n, frames).tolist() == expected


def test_centre_indices_known_values_and_repeats_for_short_videos():
    assert centre_indices(30, 8).tolist() == [1, 5, 9, 13, 16, 20, 24, 28]
    assert centre_indices(3, 8).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert centre_indices(1, 4).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        centre_indices(0, 8)


@pytest.mark.parametrize("n", [3, 8, 30, 41])
def test_random_indices_stay_inside_their_segment(n):
    rng = np.random.default_rng(0)
    start, stop = segment_bounds(n, 8)
    for _ in range(50):
        idx = random_indices(n, 8, rng)
        assert np.all(idx >= start) and np.all(idx < stop) and np.all(idx < n)
        assert np.all(np.diff(idx) >= 0)  # segments are in order


def test_random_indices_cover_every_frame_of_a_segment():
    rng = np.random.default_rng(1)
    seen = {tuple(random_indices(40, 8, rng)) for _ in range(400)}
    first = {s[0] for s in seen}
    assert first == {0, 1, 2, 3, 4}  # segment 0 of a 40-frame video is frames 0..4


def test_view_plans_are_seeded_per_video_and_view():
    kw = dict(frames=8, aug_views=3, seed=7, resize=72, image_size=64)
    a = plan_views(30, video_id="jump/v0", **kw)
    assert a == plan_views(30, video_id="jump/v0", **kw)  # reruns reproduce every view
    assert a[0].indices == tuple(centre_indices(30, 8).tolist())
    assert (a[0].top, a[0].left, a[0].flip) == (4, 4, False)  # centre crop of 72 -> 64
    assert len({p.indices + (p.top, p.left) for p in a[1:]}) == 3  # views differ
    assert plan_views(30, video_id="jump/v1", **kw)[1:] != a[1:]
    assert plan_views(30, video_id="jump/v0", **{**kw, "seed": 8})[1:] != a[1:]
    # a view does not depend on how many views are asked for
    assert plan_views(30, video_id="jump/v0", **{**kw, "aug_views": 1})[1] == a[1]
    for p in a[1:]:
        assert 0 <= p.top <= 8 and 0 <= p.left <= 8


def test_flip_is_random_but_never_when_disabled():
    kw = dict(frames=4, aug_views=1, seed=0, resize=72, image_size=64)
    flips = [plan_views(10, video_id=f"c/v{i}", **kw)[1].flip for i in range(40)]
    assert 5 < sum(flips) < 35
    assert not any(plan_views(10, video_id=f"c/v{i}", flip=False, **kw)[1].flip
                   for i in range(40))
