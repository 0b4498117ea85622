"""Compact caches (``--store-dtype bfloat16 | int8``) reach phase two as float rows on every
reader path: preloaded, streamed, and through evaluation, which scores them like the float16
cache up to the quantisation error."""

import numpy as np
import pytest
import torch

from align.evaluate import EvalConfig, evaluate
from align.feed import Feeder
from align.models import build_head
from cache import FeatureCache
from cache.recode import recode

CPU = torch.device("cpu")


@pytest.fixture
def caches(tmp_path, make_synth):
    source = make_synth(tmp_path / "f16.zarr", aug_views=2)
    return source, {d: recode(source, tmp_path / f"{d}.zarr", store_dtype=d)
                    for d in ("bfloat16", "int8")}


@pytest.mark.parametrize("store_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("preload", ["ram", "none"])
def test_feeder_serves_dequantised_float_rows(caches, store_dtype, preload):
    source, compact = caches
    with FeatureCache.open(source) as f16, FeatureCache.open(compact[store_dtype]) as small:
        assert small.store_dtype == store_dtype and small.attrs["dtype"] == "float16"
        rows = small.rows("train")[:7]
        feeder = Feeder(small, "train", device=CPU, preload=preload, progress=False)
        got = feeder.load(rows)
        streamed = next(feeder.stream([(rows, None)]))
        expected = torch.from_numpy(small.read_rows(rows)).float()
        original = torch.from_numpy(f16.read_rows(rows)).float()
        aug = Feeder(small, "train", device=CPU, preload=preload, aug=True, progress=False)
        views = aug.load(rows, np.ones(len(rows), dtype=np.int64))
        original_views = torch.from_numpy(f16.read_rows(rows, views=[1] * len(rows))).float()
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert torch.equal(streamed, expected)
    scale = original.abs().amax()
    assert (got - original).abs().max() < 0.02 * scale
    assert (views - original_views).abs().max() < 0.02 * scale


def test_evaluation_of_an_int8_cache_scores_like_float16(caches):
    source, compact = caches
    accuracy = {}
    for name, path in {"float16": source, "int8": compact["int8"]}.items():
        with FeatureCache.open(path) as cache:
            c, t, h, w = cache.shape
            torch.manual_seed(0)
            head = build_head("protonet", channels=c, frames=t, height=h, width=w, shot=1)
            out = evaluate(head, cache, EvalConfig(episodes=40, shot=1, seed=3), device=CPU,
                           head_config={"kind": "protonet"}, progress=False)
            accuracy[name] = np.asarray(out["episode_accuracy"])
    # identical episodes; int8's error moves few if any predictions
    assert abs(accuracy["int8"].mean() - accuracy["float16"].mean()) <= 0.05
