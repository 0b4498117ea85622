"""Fixtures of the classify tests: one compute thread; the clips world (toy clips, a cache
extracted from them, checkpoints) lives in classify_world.py."""

import pytest
import torch
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems on a shared 2-core machine run faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)
