"""Fixtures of these tests; the helpers and constants they share live in cache_testing.py
(importable by name from any test folder, unlike a conftest)."""

import pytest
from cache_testing import CLASSES, SHAPE, make_rows

from cache import FeatureCache


@pytest.fixture(params=["zarr", "hdf5"])
def backend(request):
    return request.param


@pytest.fixture
def cache_path(tmp_path, backend):
    return str(tmp_path / ("feats.h5" if backend == "hdf5" else "feats.zarr"))


@pytest.fixture
def empty_cache(cache_path, backend):
    video_ids, splits, labels = make_rows()
    cache = FeatureCache.create(cache_path, video_ids=video_ids, splits=splits, labels=labels,
                                classes=CLASSES, shape=SHAPE, backend=backend,
                                attrs={"backbone": "resnet50", "mean": [0.485, 0.456, 0.406]})
    yield cache
    cache.close()
