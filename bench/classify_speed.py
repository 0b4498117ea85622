"""classify's scoring speed: query clips against support classes from a prepared cache (maps
already there, as on a `classify --features` rerun), through ``classify.scoring.class_logits``
(per-clip states once, then the (class, query) pairs), against a script's way of doing it - one
``head(support, query, way, shot)`` episode per query, which redoes every class's work for
every query.

    python bench/classify_speed.py                        # 1000 queries, 20 classes, C=2048
    python bench/classify_speed.py --channels 256 --queries 200     # a quick look
    python bench/classify_speed.py --shot 5 --device cuda

It writes a synthetic test split (``--classes`` classes, C x T x H x W = 2048 x 8 x 7 x 7 by
default) into a temporary cache (or reads ``--cache``), takes the first ``--shot`` videos of each
class as the support set and ``--queries`` others as queries. The head is TA2N with seeded
weights (its zero-started last layers too, so TTM and SC do not start as the identity); with
``--shot 1`` it is a 1-shot head (K rule "one"), else a K-shot head (rule "many"). Prints the
per-query time of both (the script's way timed on ``--baseline-queries`` queries: it shares
nothing between queries), their ratio, classify's split into states and pairs, and whether both
predict the same classes on the shared queries. Loading the maps is excluded from both.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval_speed import seeded_head  # noqa: E402  (a sibling script, as backbones.py does)

from align.evaluate import sync  # noqa: E402
from cache import FeatureCache  # noqa: E402
from cache.synthetic import SynthConfig, generate_synthetic  # noqa: E402
from classify.scoring import class_logits  # noqa: E402
from cli import pick_device  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--baseline-queries", type=int, default=10)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--shot", type=int, default=1, help="support clips per class")
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=7, help="H = W")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--cache", default=None, help="use this cache's test split")
    return p.parse_args(argv)


def support_and_queries(cache: FeatureCache, args) -> tuple[np.ndarray, np.ndarray]:
    """Rows: the first ``shot`` test videos of each of ``classes`` classes, and ``queries``
    other test videos of those classes (cycling through them)."""
    rows = cache.rows("test")
    labels = cache.labels[rows]
    classes = np.unique(labels)[:args.classes]
    support = np.concatenate([rows[labels == c][:args.shot] for c in classes])
    rest = np.setdiff1d(rows[np.isin(labels, classes)], support)
    if len(classes) < args.classes or not len(rest):
        sys.exit(f"{cache.path}: too few test classes or videos for {args.classes} classes "
                 f"of {args.shot} + queries")
    return support, rest[np.arange(args.queries) % len(rest)]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.cache
        if path is None:
            path = str(Path(tmp) / "classify-bench.zarr")
            generate_synthetic(path, SynthConfig(
                channels=args.channels, frames=args.frames, size=args.size, train_classes=0,
                val_classes=0, test_classes=args.classes, videos_per_class=args.shot + 10,
                seed=0), progress=False)
        with FeatureCache.open(path) as cache:
            support_rows, query_rows = support_and_queries(cache, args)
            support = torch.from_numpy(cache.read_rows(support_rows))  # stored dtype
            unique, inverse = np.unique(query_rows, return_inverse=True)
            query = torch.from_numpy(cache.read_rows(unique))[torch.from_numpy(inverse)]
            shape = cache.shape
    head = seeded_head(args, "maps").eval().to(device)  # eval: BatchNorm on running stats
    members = [list(range(c * args.shot, (c + 1) * args.shot)) for c in range(args.classes)]
    way = args.classes

    # the script's way: one episode per query through the head's direct maps path
    baseline = query[:args.baseline_queries]
    maps = support.to(device).float()
    with torch.inference_mode():
        head(maps, baseline[:1].to(device).float(), way, args.shot)  # warm-up
        sync(device)
        start = time.perf_counter()
        script = [head(maps, q[None].to(device).float(), way, args.shot).argmax(-1).item()
                  for q in baseline]
        sync(device)
    script_s = (time.perf_counter() - start) / len(baseline)

    # classify: per-clip states once (precompute), then the pairs
    head.set_path("factored")
    class_logits(head, support, members, query[:1], device=device)  # warm-up
    sync(device)
    start = time.perf_counter()
    logits = class_logits(head, support, members, query, device=device)
    sync(device)
    total = time.perf_counter() - start
    start = time.perf_counter()  # the states alone: the query-independent part plus one query
    class_logits(head, support, members, query[:1], device=device)
    sync(device)
    fixed = time.perf_counter() - start
    same = logits[:len(baseline)].argmax(-1).tolist() == script

    c, t, h, w = shape
    where = f"{device.type}, {torch.get_num_threads()} threads"
    print(f"TA2N, {way} classes x {args.shot} support clip(s), {len(query)} queries, "
          f"C={c} T={t} {h}x{w}, on {where}")
    print(f"  one episode per query  {1000 * script_s:9.1f} ms per query  (timed on "
          f"{len(baseline)} queries)")
    print(f"  classify               {1000 * total / len(query):9.1f} ms per query  "
          f"({len(query)} queries in {total:.1f} s; support states + 1 query alone: "
          f"{fixed:.2f} s)")
    print(f"  ratio                  {script_s * len(query) / total:9.1f}x   same predictions on "
          f"the {len(baseline)} shared queries: {same}")


if __name__ == "__main__":
    main()
