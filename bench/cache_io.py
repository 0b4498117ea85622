"""Benchmark the feature cache at the real row shape (2048 x 8 x 7 x 7, float16).

    python bench/cache_io.py [--rows 200] [--dir /tmp/cache-bench]

For each backend (zarr with Blosc zstd-1 + byte shuffle, HDF5 with gzip-1 + shuffle) it prints MB/s
(uncompressed bytes) for writing rows one by one, loading the whole split, and random single-row
reads, plus bytes per row on disk. Then it compares candidate compressors on the same rows, which
is how the zarr default was chosen. Rows are synthetic but shaped like ResNet-50 layer4 output:
non-negative after ReLU, about half zeros. Reads right after writes come from the page cache unless
--drop-caches works (it needs root and a writable /proc/sys/vm/drop_caches).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from numcodecs import Blosc, Zstd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cache import FeatureCache  # noqa: E402

SHAPE = (2048, 8, 7, 7)


def synthetic_rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.normal(-0.1, 0.8, size=(n, *SHAPE)).astype(np.float32)
    return np.maximum(rows, 0).astype(np.float16)  # ReLU output: about half zeros


def drop_page_cache() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_backend(backend: str, path: Path, rows: np.ndarray, drop: bool, seed: int) -> dict:
    n = len(rows)
    mb = rows.nbytes / 2**20
    cache = FeatureCache.create(path, video_ids=[f"c/v{i}" for i in range(n)],
                                splits=["train"] * n, labels=[0] * n, classes=["c"],
                                shape=SHAPE, backend=backend, overwrite=True)
    write_s = timed(lambda: [cache.write_row(i, rows[i]) for i in range(n)])
    cache.close()
    dropped = drop and drop_page_cache()
    cache = FeatureCache.open(path)
    load_s = timed(lambda: cache.load_split("train"))
    picks = np.random.default_rng(seed).integers(0, n, size=min(n, 100))
    dropped = dropped and drop_page_cache()
    random_s = timed(lambda: [cache.read_row(int(i)) for i in picks])
    info = cache.info()
    cache.close()
    return {
        "backend": backend,
        "write MB/s": mb / write_s,
        "load split MB/s": mb / load_s,
        "random row MB/s": len(picks) * rows[0].nbytes / 2**20 / random_s,
        "rows/s random": len(picks) / random_s,
        "bytes/row on disk": info["bytes_on_disk"] / n,
        "ratio": info["compression_ratio"],
        "cold": dropped,
    }


def compare_compressors(rows: np.ndarray) -> None:
    candidates = {
        "blosc zstd-3 shuffle": Blosc("zstd", 3, Blosc.SHUFFLE),
        "blosc zstd-1 shuffle (zarr default)": Blosc("zstd", 1, Blosc.SHUFFLE),
        "blosc lz4-5 shuffle": Blosc("lz4", 5, Blosc.SHUFFLE),
        "blosc zstd-3 bitshuffle": Blosc("zstd", 3, Blosc.BITSHUFFLE),
        "blosc zstd-3 no shuffle": Blosc("zstd", 3, Blosc.NOSHUFFLE),
        "zstd-3 (no blosc)": Zstd(3),
    }
    print(f"\n{'compressor':<38}{'ratio':>7}{'comp MB/s':>11}{'decomp MB/s':>13}")
    mb = rows.nbytes / 2**20
    for name, codec in candidates.items():
        start = time.perf_counter()
        encoded = [codec.encode(r) for r in rows]
        comp_s = time.perf_counter() - start
        start = time.perf_counter()
        for e in encoded:
            codec.decode(e)
        decomp_s = time.perf_counter() - start
        ratio = rows.nbytes / sum(len(e) for e in encoded)
        print(f"{name:<38}{ratio:>7.2f}{mb / comp_s:>11.0f}{mb / decomp_s:>13.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ta2n-cache-bench"))
    parser.add_argument("--drop-caches", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = synthetic_rows(args.rows, args.seed)
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"{args.rows} rows of {SHAPE} float16 = {rows.nbytes / 2**20:.0f} MB uncompressed, "
          f"{rows[0].nbytes / 2**20:.2f} MB per row")
    results = [bench_backend("zarr", args.dir / "bench.zarr", rows, args.drop_caches, args.seed),
               bench_backend("hdf5", args.dir / "bench.h5", rows, args.drop_caches, args.seed)]
    keys = [k for k in results[0] if k != "backend"]
    print(f"\n{'':<20}" + "".join(f"{r['backend']:>12}" for r in results))
    for key in keys:
        cells = "".join(f"{r[key]:>12.2f}" if isinstance(r[key], float) else f"{r[key]!s:>12}"
                        for r in results)
        print(f"{key:<20}{cells}")
    compare_compressors(rows[: min(len(rows), 50)])
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
