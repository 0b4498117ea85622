"""bench/compact_caches.py --compare: an existing cache is paired with the source only if it holds
the same videos (else the paired test would pair unrelated episodes)."""

import pytest
from bench_testing import load_bench_script

from cache.recode import recode
from cache.synthetic import SynthConfig, generate_synthetic

SMALL = dict(channels=4, size=4, train_classes=5, val_classes=5, test_classes=5,
             videos_per_class=3)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    base = tmp_path_factory.mktemp("compact")
    source = base / "source.zarr"
    generate_synthetic(str(source), SynthConfig(**SMALL, seed=0), progress=False)
    same = recode(source, base / "int8.zarr", store_dtype="int8")
    other = base / "other.zarr"
    generate_synthetic(str(other), SynthConfig(**{**SMALL, "videos_per_class": 4}, seed=0),
                       progress=False)
    return source, same, other


def test_a_compact_copy_of_the_same_videos_is_accepted(caches):
    source, same, _ = caches
    load_bench_script("compact_caches.py").check_same_videos(source, same)


def test_a_cache_of_other_videos_is_refused(caches):
    source, _, other = caches
    with pytest.raises(SystemExit, match="differ from .* not the same videos"):
        load_bench_script("compact_caches.py").check_same_videos(source, other)
