"""Small caches for the cache tests: a handful of rows of a tiny (C, T, H, W)."""

import numpy as np
import pytest

from cache import FeatureCache

SHAPE = (6, 4, 3, 3)
CLASSES = ["jump", "run", "swim"]


def row_values(row: int, shape=SHAPE) -> np.ndarray:
    """Deterministic, row-specific content that survives float16 exactly."""
    base = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 50
    return (base + row) / 8


def make_rows(n: int = 9):
    video_ids = [f"{CLASSES[i % 3]}/v{i:03d}" for i in range(n)]
    splits = ["train", "val", "test"] * (n // 3)
    labels = [i % 3 for i in range(n)]
    return video_ids, splits, labels


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
