"""A copy of a cache with its rows stored another way (``--store-dtype``, ``--codec``): the same
videos, labels, splits, attributes and done rows, so that both caches draw identical episodes and
only the stored form differs (how ``bench/compact_caches.py`` measures what int8 costs)."""

from __future__ import annotations

import os

import numpy as np

from cache.store import FeatureCache

RECODE_ROWS = 64  # rows per read (bounded memory)


def recode(source: str | os.PathLike, out: str | os.PathLike, *, store_dtype: str | None = None,
           codec: str | None = None, backend: str | None = None) -> str:
    """Write ``out``, a copy of the cache at ``source`` with rows stored as ``store_dtype``
    (None: the maps' dtype) and compressed with ``codec``; returns its path."""
    with FeatureCache.open(source) as src:
        attrs = {k: v for k, v in src.attrs.items()
                 if k not in ("schema_version", "codec", "store_dtype")}
        rows = src.rows()
        with FeatureCache.create(out, video_ids=list(src.video_ids), splits=list(src.splits),
                                 labels=src.labels.tolist(), classes=src.classes,
                                 shape=src.shape, dtype=src.dtype, aug_views=src.aug_views,
                                 attrs=attrs, backend=backend, codec=codec,
                                 store_dtype=store_dtype) as dst:
            for start in range(0, len(rows), RECODE_ROWS):
                chunk = rows[start:start + RECODE_ROWS]
                maps = src.read_rows(chunk, check_done=False)
                views = [src.read_rows(chunk, views=np.full(len(chunk), v), check_done=False)
                         for v in range(src.aug_views)]
                for i, row in enumerate(chunk.tolist()):
                    aug = np.stack([v[i] for v in views]) if views else None
                    dst.write_row(row, maps[i], aug)
            return dst.path
