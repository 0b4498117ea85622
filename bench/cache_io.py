"""Benchmark the feature cache at the real row shape (2048 x 8 x 7 x 7, float16).

    python bench/cache_io.py [--rows 200] [--dir /tmp/cache-bench] [--writers 1,2,4]
                             [--only-writers] [--only-codecs] [--only-store-dtypes]

Row writes against their codec (issue 26; ``--only-codecs``): for every ``--codec``, numcodecs'
raw encode speed on one core (Blosc's own threads off) next to one writer thread's
``FeatureCache.write_row`` (codec, CRC32C, done flags, files) on the same rows, in alternating
rounds; the median of the per-round ratios is printed, with bytes per row on disk, and the same
for zarr's own ``array[row] = value`` path that rows took before the synchronous writes. Then
the stored dtypes (``--only-store-dtypes``): int8 symmetric vs affine and bfloat16 error, bytes
per row, and read rates of the whole split and of random rows for each.

First it writes the same rows with 1, 2, 4 threads (``extract --writers``) and prints the zarr
write rate of each and its ratio to one thread.

For each backend (zarr with Blosc zstd-1 + byte shuffle, HDF5 with gzip-1 + shuffle) it prints MB/s
(uncompressed bytes) for writing rows one by one, loading the whole split, and random single-row
reads, plus bytes per row on disk. Then it measures what the per-row checksums cost (CRC32C in
zarr, Fletcher-32 in HDF5, checked on every read, plus the scan for rows that read as the fill
value): the same rows are written with and without checksums (the layout caches had before them)
and read back (and rewritten) through the same API, back to back in each of --repeats rounds; the
median of the per-round time ratios is printed. Last it compares candidate compressors on the same
rows, which is how the zarr default was chosen. Rows are synthetic but shaped like ResNet-50 layer4
output: non-negative after ReLU, about half zeros. Reads right after writes come from the page
cache unless --drop-caches works (it needs root and a writable /proc/sys/vm/drop_caches). It
deletes only the cache_io/ folder it makes under --dir.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
from numcodecs import LZ4, Blosc, Zstd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cache import FeatureCache, hdf5_store, zarr_store  # noqa: E402
from cache.codecs import ZARR_CODECS  # noqa: E402
from cache.store import fill_rows  # noqa: E402
from cache.store_dtype import STORE_DTYPES, dequantize_int8, quantize_int8  # noqa: E402

# numcodecs' own form of each --codec: the raw speed a writer is measured against
RAW_CODECS = {"zstd": Zstd(1), "blosc-zstd": Blosc("zstd", 1, Blosc.SHUFFLE), "lz4": LZ4(),
              "blosc-lz4": Blosc("lz4", 5, Blosc.SHUFFLE), "none": None}

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


def write_cache(path: Path, backend: str, rows: np.ndarray, checksums: bool) -> float:
    """Write ``rows`` to a new cache, with or without the row checksums; seconds taken."""
    saved = zarr_store.ROW_CHECKSUM, hdf5_store.ROW_CHECKSUM
    if not checksums:  # the layout of caches made before checksums existed
        zarr_store.ROW_CHECKSUM, hdf5_store.ROW_CHECKSUM = False, False
    try:
        n = len(rows)
        with FeatureCache.create(path, video_ids=[f"c/v{i}" for i in range(n)],
                                 splits=["train"] * n, labels=[0] * n, classes=["c"],
                                 shape=SHAPE, backend=backend, overwrite=True) as cache:
            assert cache.checksummed == checksums
            return timed(lambda: [cache.write_row(i, rows[i]) for i in range(n)])
    finally:
        zarr_store.ROW_CHECKSUM, hdf5_store.ROW_CHECKSUM = saved


def integrity_overhead(backend: str, folder: Path, rows: np.ndarray, repeats: int,
                       seed: int) -> dict:
    """Time with checksums over time without, on identical rows: each repeat times both caches
    back to back (so both see the same machine load) and the median of the per-repeat ratios is
    kept. Writes rewrite the first rows of each cache in turn."""
    suffix = ".h5" if backend == "hdf5" else ".zarr"
    paths = {c: folder / f"{'checked' if c else 'unchecked'}{suffix}" for c in (False, True)}
    for checked in (False, True):
        write_cache(paths[checked], backend, rows, checked)
    picks = np.random.default_rng(seed).integers(0, len(rows), size=min(len(rows), 100))
    rewrite = range(min(len(rows), 20))
    times = {key: {False: [], True: []} for key in ("load", "random", "write")}
    for _ in range(repeats):
        for checked in (False, True):
            with FeatureCache.open(paths[checked], mode="r+") as cache:
                times["load"][checked].append(timed(lambda c=cache: c.load_split("train")))
                times["random"][checked].append(
                    timed(lambda c=cache: [c.read_row(int(i)) for i in picks]))
                times["write"][checked].append(
                    timed(lambda c=cache: [c.write_row(i, rows[i]) for i in rewrite]))
    with FeatureCache.open(paths[True]) as cache:
        split = cache.load_split("train").features
    scan_s = min(timed(lambda: fill_rows(split, np.nan)) for _ in range(repeats))
    mb = rows.nbytes / 2**20

    def ratio(key: str) -> float:
        return float(np.median(np.divide(times[key][True], times[key][False])))

    return {
        "backend": backend,
        "load MB/s checked": mb / float(np.median(times["load"][True])),
        "load MB/s unchecked": mb / float(np.median(times["load"][False])),
        "load time ratio": ratio("load"),
        "random time ratio": ratio("random"),
        "write time ratio": ratio("write"),
        "fill scan % of load": 100 * scan_s / float(np.median(times["load"][True])),
    }


def write_rows(cache: FeatureCache, pool: ThreadPoolExecutor, rows: np.ndarray) -> None:
    list(pool.map(lambda i: cache.write_row(i, rows[i]), range(len(rows))))


def writer_scaling(folder: Path, rows: np.ndarray, counts: list[int]) -> list[dict]:
    """Zarr write rate with N threads calling write_row on disjoint rows (what `extract
    --writers N` does), the same rows for every N; the ratio is to one thread in this run."""
    results = []
    for threads in counts:
        path = folder / f"writers{threads}.zarr"
        n = len(rows)
        with FeatureCache.create(path, video_ids=[f"c/v{i}" for i in range(n)],
                                 splits=["train"] * n, labels=[0] * n, classes=["c"],
                                 shape=SHAPE, backend="zarr", overwrite=True) as cache, \
                ThreadPoolExecutor(threads) as pool:
            seconds = timed(lambda c=cache, p=pool: write_rows(c, p, rows))
        results.append({"backend": f"{threads} thread{'s' if threads > 1 else ''}",
                        "write MB/s": rows.nbytes / 2**20 / seconds, "rows/s": n / seconds})
    for r in results:
        r["x one thread"] = r["write MB/s"] / results[0]["write MB/s"]
    return results


def print_table(results: list[dict]) -> None:
    keys = [k for k in results[0] if k != "backend"]
    print(f"\n{'':<24}" + "".join(f"{r['backend']:>12}" for r in results))
    for key in keys:
        cells = "".join(f"{r[key]:>12.3f}" if isinstance(r[key], float) else f"{r[key]!s:>12}"
                        for r in results)
        print(f"{key:<24}{cells}")


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
        if "zarr default" in name:
            checksum_s = min(timed(lambda e=encoded: [google_crc32c.value(x) for x in e])
                             for _ in range(5))
            default_decode_s = decomp_s
    print(f"CRC32C of the zstd-1 chunks (what reads add in zarr): {mb / checksum_s:.0f} MB/s of "
          f"rows, {100 * checksum_s / default_decode_s:.1f}% of their decode time")


def new_cache(path: Path, n: int, **options) -> FeatureCache:
    return FeatureCache.create(path, video_ids=[f"c/v{i}" for i in range(n)],
                               splits=["train"] * n, labels=[0] * n, classes=["c"], shape=SHAPE,
                               backend="zarr", overwrite=True, **options)


def raw_encode(codec, rows: np.ndarray) -> float:
    """Seconds for numcodecs to encode ``rows`` one by one (CRC32C for codec None)."""
    if codec is None:
        return timed(lambda: [google_crc32c.value(r.tobytes()) for r in rows])
    return timed(lambda: [codec.encode(r) for r in rows])


def write_with(path: Path, rows: np.ndarray, codec: str, zarr_path: bool) -> tuple[float, float]:
    """Seconds for one thread to write ``rows`` into a fresh cache, and bytes per row on disk;
    ``zarr_path``: through zarr's ``array[row] = value`` instead of the synchronous row writes."""
    with new_cache(path, len(rows), codec=codec) as cache:
        if zarr_path:
            cache._backend._sync_rows = {"features": False, "done": False}
        seconds = timed(lambda: [cache.write_row(i, rows[i]) for i in range(len(rows))])
        return seconds, cache._backend.array("features").nbytes_stored() / len(rows)


def codec_table(folder: Path, rows: np.ndarray, rounds: int) -> list[dict]:
    """Per codec: raw encode MB/s, writer MB/s (synchronous and zarr's path), their ratios
    (median of per-round ratios: each round times all three back to back), bytes per row."""
    numcodecs.blosc.use_threads = False  # one core, as in a writer thread
    mb = rows.nbytes / 2**20
    results = []
    for name in ZARR_CODECS:
        raw, sync, own, size = [], [], [], 0.0
        for _ in range(rounds):
            raw.append(raw_encode(RAW_CODECS[name], rows))
            seconds, size = write_with(folder / f"{name}.zarr", rows, name, zarr_path=False)
            sync.append(seconds)
            own.append(write_with(folder / f"{name}-zarr.zarr", rows, name, zarr_path=True)[0])
        raw, sync, own = (np.asarray(v) for v in (raw, sync, own))
        results.append({
            "backend": name, "raw MB/s": mb / float(np.median(raw)),
            "writer MB/s": mb / float(np.median(sync)),
            "writer/raw": float(np.median(raw / sync)),
            "zarr path MB/s": mb / float(np.median(own)),
            "zarr path/raw": float(np.median(raw / own)),
            "MB/row on disk": size / 2**20, "ratio": rows[0].nbytes / size})
    crc = min(timed(lambda: [google_crc32c.value(r.tobytes()) for r in rows]) for _ in range(3))
    print(f"\nCRC32C alone: {mb / crc:.0f} MB/s (numcodecs' codecs: one core, Blosc threads off; "
          f"'none' raw = CRC32C)")
    return results


def quantisation_error(rows: np.ndarray) -> None:
    """int8 symmetric vs affine (one (offset, scale) per video and channel) and bfloat16 on the
    same rows: error relative to each channel's range, and to the float16 values."""
    from cache.store_dtype import from_bfloat16_bits, to_bfloat16_bits

    x = rows.astype(np.float32)
    span = (x.max(axis=(2, 3, 4)) - x.min(axis=(2, 3, 4)))[..., None, None, None]
    norm = float(np.sqrt((x ** 2).mean()))
    print(f"\n{'stored as':<18}{'max |err| / range':>19}{'rms err / rms x':>17}")
    for mode in ("symmetric", "affine"):
        back = dequantize_int8(*quantize_int8(x, mode), "float32")
        err = np.abs(back - x)
        print(f"{'int8 ' + mode:<18}{float((err / np.where(span > 0, span, 1)).max()):>19.5f}"
              f"{float(np.sqrt((err ** 2).mean())) / norm:>17.5f}")
    err = np.abs(from_bfloat16_bits(to_bfloat16_bits(x), "float32") - x)
    print(f"{'bfloat16':<18}{float((err / np.where(span > 0, span, 1)).max()):>19.5f}"
          f"{float(np.sqrt((err ** 2).mean())) / norm:>17.5f}")


def store_dtype_table(folder: Path, rows: np.ndarray, seed: int) -> list[dict]:
    """Per stored dtype (default codec): write rate, bytes per row, and the read rates of the
    whole split and of random rows (MB/s of the float16 rows readers get)."""
    n, mb = len(rows), rows.nbytes / 2**20
    picks = np.random.default_rng(seed).integers(0, n, size=min(n, 100))
    results = []
    for name in STORE_DTYPES:
        if name == "float32":
            continue
        path = folder / f"dtype-{name}.zarr"
        with new_cache(path, n, store_dtype=name) as cache:
            write_s = timed(lambda c=cache: [c.write_row(i, rows[i]) for i in range(n)])
        with FeatureCache.open(path) as cache:
            load_s = timed(lambda c=cache: c.load_split("train"))
            random_s = timed(lambda c=cache: [c.read_row(int(i)) for i in picks])
            size = sum(cache._backend.array(a).nbytes_stored() for a in cache._row_arrays()) / n
        results.append({"backend": name, "write MB/s": mb / write_s,
                        "load split MB/s": mb / load_s,
                        "random row MB/s": len(picks) * rows[0].nbytes / 2**20 / random_s,
                        "MB/row on disk": size / 2**20})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ta2n-cache-bench"))
    parser.add_argument("--drop-caches", action="store_true")
    parser.add_argument("--repeats", type=int, default=7,
                        help="Rounds of the checksum comparison (median ratio).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writers", default="1,2,4",
                        help="Comma-separated writer thread counts to compare (zarr).")
    parser.add_argument("--only-writers", action="store_true",
                        help="Run only the writer-thread comparison.")
    parser.add_argument("--only-codecs", action="store_true",
                        help="Run only the codec comparison (raw encode vs writer).")
    parser.add_argument("--only-store-dtypes", action="store_true",
                        help="Run only the stored-dtype comparison (error, size, read rates).")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Rounds of the codec comparison (median ratio).")
    args = parser.parse_args()

    rows = synthetic_rows(args.rows, args.seed)
    made_dir = not args.dir.exists()
    work = args.dir / "cache_io"  # the only thing this script deletes at the end
    if work.exists():
        sys.exit(f"{work} exists: remove it or pass another --dir")
    work.mkdir(parents=True)
    try:
        print(f"{args.rows} rows of {SHAPE} float16 = {rows.nbytes / 2**20:.0f} MB "
              f"uncompressed, {rows[0].nbytes / 2**20:.2f} MB per row")
        if args.only_codecs or args.only_store_dtypes:
            if args.only_codecs:
                print("\nrow writes (one thread) against the codec's raw encode speed")
                print_table(codec_table(work, rows, args.rounds))
            if args.only_store_dtypes:
                quantisation_error(rows)
                print_table(store_dtype_table(work, rows, args.seed))
            return
        print(f"\nzarr writes by N threads ({os.cpu_count()} CPUs; extract --writers N)")
        print_table(writer_scaling(work, rows, [int(c) for c in args.writers.split(",")]))
        if args.only_writers:
            return
        print()
        print_table([bench_backend(b, work / f"bench.{s}", rows, args.drop_caches, args.seed)
                     for b, s in (("zarr", "zarr"), ("hdf5", "h5"))])
        print("\nrow checksums: the same rows with / without them, warm page cache")
        print_table([integrity_overhead(b, work, rows, args.repeats, args.seed)
                     for b in ("zarr", "hdf5")])
        compare_compressors(rows[: min(len(rows), 50)])
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if made_dir:
            args.dir.rmdir()


if __name__ == "__main__":
    main()
