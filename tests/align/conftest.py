"""Fixtures every phase-two test shares: one compute thread, and small synthetic caches."""

import pytest
import torch
from threadpoolctl import threadpool_limits

from cache.synthetic import SynthConfig, generate_synthetic

# small enough for a few-second test, large enough for every split to hold 5-way episodes
TINY_SYNTH = dict(channels=8, frames=8, size=4, train_classes=6, val_classes=5, test_classes=5,
                  videos_per_class=6, seed=2)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems on a shared 2-core machine run faster on one thread (torch and the
    OpenMP pools of numpy / scikit-learn alike)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_synth():
    """``make_synth(path, **overrides)`` writes a small synthetic cache and returns its path
    (``TINY_SYNTH`` with the overrides)."""

    def make(path, **overrides) -> str:
        generate_synthetic(str(path), SynthConfig(**{**TINY_SYNTH, **overrides}), progress=False)
        return str(path)

    return make
