"""Fixtures of these tests; the helpers and constants they share live in extract_testing.py
(importable by name from any test folder, unlike a conftest)."""

from __future__ import annotations

import pytest
import torch
from extract_testing import (
    TINY_LINES,
    TINY_VIDEOS,
    build_dataset,
    random_resnet18,
)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """(root, split_dir) of the generated custom dataset."""
    base = tmp_path_factory.mktemp("videos")
    build_dataset(base / "root", base / "splits")
    return base / "root", base / "splits"


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    """A plain resnet18 state dict (with fc), as a user would pass with --weights PATH."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(random_resnet18().state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP waiting for a descheduled second
    thread makes every small forward pass tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """(root, split_dir) of four frame-folder videos, the last one corrupt (it always fails)."""
    base = tmp_path_factory.mktemp("tiny")
    build_dataset(base / "root", base / "splits", TINY_VIDEOS, TINY_LINES)
    return base / "root", base / "splits"
