"""The `synth` cache: the contract's format, classes that differ only in order, ground truth."""

import json

import numpy as np
import pytest

from cache import FeatureCache, UserError
from cache.synthetic import SynthConfig, generate_synthetic

TINY = dict(channels=8, frames=6, size=4, patterns=4, length=0, train_classes=3, val_classes=2,
            test_classes=2, videos_per_class=3, seed=5)


def test_synthetic_cache_follows_the_contract(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "synth.zarr")
    summary = generate_synthetic(out, SynthConfig(**TINY), progress=False)
    assert summary["rows"] == 7 * 3
    with FeatureCache.open(out) as cache:
        assert cache.shape == (8, 6, 4, 4)
        assert cache.attrs["dataset"] == "synthetic"
        assert cache.done.all()
        counts = {s: len(np.unique(cache.labels[cache.rows(s)])) for s in ("train", "val", "test")}
        assert counts == {"train": 3, "val": 2, "test": 2}
        # classes never cross splits (few-shot: test classes are unseen)
        splits_of = {c: set(cache.splits[cache.labels == c]) for c in range(len(cache.classes))}
        assert all(len(s) == 1 for s in splits_of.values())
        truth = cache.attrs["synthetic"]
        assert truth["config"]["channels"] == 8
        assert len(truth["windows"]) == len(truth["positions"]) == len(cache)
        for start, stop in truth["windows"]:
            assert 0 <= start < stop <= 6 and stop - start >= 3  # min_duration 0.5 of T=6
        # every class is an order of the same patterns
        seqs = list(truth["sequences"].values())
        assert all(sorted(s) == [0, 1, 2, 3] for s in seqs) and len({tuple(s) for s in seqs}) == 7
    # `train-heads` with no --cache finds it
    assert json.loads((tmp_path / "caches" / "latest.json").read_text())["path"] == out


def test_signal_sits_in_the_window_and_the_blob(tmp_path, monkeypatch):
    """Without noise and background, frames outside the window are zero and the action's
    energy peaks at the recorded position."""
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "clean.zarr")
    generate_synthetic(out, SynthConfig(**{**TINY, "size": 5}, noise=0.0, background=0.0,
                                        dtype="float32"), progress=False)
    with FeatureCache.open(out) as cache:
        truth = cache.attrs["synthetic"]
        for row in range(len(cache)):
            maps = cache.read_row(row)  # (C, T, H, W)
            start, stop = truth["windows"][row]
            energy = np.abs(maps).sum(axis=(0, 2, 3))  # (T,)
            assert (energy[start:stop] > 0).all() and (energy[:start] == 0).all()
            assert (energy[stop:] == 0).all()
            x, y = truth["positions"][row]
            spatial = np.abs(maps).sum(axis=(0, 1))  # (H, W)
            peak_y, peak_x = np.unravel_index(spatial.argmax(), spatial.shape)
            assert abs(peak_x - x) <= 0.5 and abs(peak_y - y) <= 0.5


def test_same_seed_same_cache_and_aug_views(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = str(tmp_path / "a.h5"), str(tmp_path / "b.zarr")
    generate_synthetic(a, SynthConfig(**TINY, aug_views=2), progress=False)
    generate_synthetic(b, SynthConfig(**TINY, aug_views=2), progress=False)
    with FeatureCache.open(a) as ca, FeatureCache.open(b) as cb:
        assert ca.backend == "hdf5" and cb.backend == "zarr"
        assert ca.aug_views == 2
        np.testing.assert_array_equal(ca.read_rows(ca.rows()), cb.read_rows(cb.rows()))
        np.testing.assert_array_equal(ca.read_row(4, view=1), cb.read_row(4, view=1))
        assert not np.array_equal(ca.read_row(4, view=0), ca.read_row(4))


def test_sequence_classes(tmp_path, monkeypatch):
    """--length L: classes are sequences of L shared patterns without immediate repeats."""
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "seq.zarr")
    generate_synthetic(out, SynthConfig(**{**TINY, "patterns": 3, "length": 5}), progress=False)
    with FeatureCache.open(out) as cache:
        seqs = [tuple(s) for s in cache.attrs["synthetic"]["sequences"].values()]
    assert len(set(seqs)) == 7 and all(len(s) == 5 for s in seqs)
    assert all(a != b for s in seqs for a, b in zip(s, s[1:]))
    assert set().union(*seqs) <= {0, 1, 2}


def test_impossible_configs_are_refused(tmp_path):
    with pytest.raises(UserError, match="patterns"):
        generate_synthetic(str(tmp_path / "x.zarr"),
                           SynthConfig(**{**TINY, "patterns": 3}), progress=False)
    with pytest.raises(UserError, match="frames >= 4"):
        generate_synthetic(str(tmp_path / "y.zarr"),
                           SynthConfig(**{**TINY, "frames": 3}), progress=False)
