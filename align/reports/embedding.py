"""`python cli.py analyze embedding` (paper Fig. 8): t-SNE of queries and prototypes before and
after a head's alignment, with the mean own / other prototype distance ratio from the exact
pair distances."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tqdm import tqdm

from align.models.layers import frame_cosine_distance
from align.reports.common import default_out
from align.reports.configs import EmbeddingConfig  # noqa: F401 (its config, re-exported)
from cache import FeatureCache, UserError
from cache.atomic import write_json
from cache.paths import check_writable


def _unit_frames(x: torch.Tensor) -> torch.Tensor:
    """Each frame scaled to unit length, then (..., T, C) flattened: the squared Euclidean
    distance of two such vectors is twice their frame-wise cosine distance, so t-SNE sees the
    heads' metric."""
    return torch.nn.functional.normalize(x, dim=-1).flatten(-2)  # (..., T*C)


def embed_episode(head, support: torch.Tensor, query: torch.Tensor, way: int,
                  shot: int) -> dict:
    """Points and distances of one episode, before and after the head's alignment.

    Before: spatial mean per frame of the raw maps, prototype = mean over shots (ProtoNet's
    view). After: the head's pair features; query m is drawn as f_q of its pair with its own
    class, prototype n as the (per-frame unit) mean over its class's queries m of f_s of pair
    (n, m), which is f_s itself where f_s does not depend on the query (no SC). The
    distances (N, M) are the exact pair distances (the head's own for "after"), which is what
    the ratio uses; the drawn points only approximate the pairs with other classes.
    """
    targets = torch.arange(way, device=query.device).repeat_interleave(len(query) // way)  # (M,)
    pooled = support.float().mean((-2, -1)).transpose(1, 2)  # (way*shot, T, C)
    protos = pooled.reshape(way, shot, *pooled.shape[1:]).mean(1)  # (N, T, C)
    queries = query.float().mean((-2, -1)).transpose(1, 2)  # (M, T, C)
    before = frame_cosine_distance(protos[:, None].transpose(-1, -2),
                                   queries[None].transpose(-1, -2))  # (N, M)
    record = head.explain(support, query, way, shot)
    if "f_s" not in record:
        raise UserError(f"the {head.kind} head has no aligned pair "
                        f"features to embed; use a ta2n checkpoint (or protonet)")
    f_s, f_q = record["f_s"].float(), record["f_q"].float()  # (N, M, T, C) each
    m_index = torch.arange(len(query), device=query.device)
    unit_f_s = torch.nn.functional.normalize(f_s, dim=-1)  # (N, M, T, C)
    proto_after = torch.stack([unit_f_s[n, targets == n].mean(0) for n in range(way)])  # (N, T, C)
    return {
        "targets": targets.cpu().numpy(),
        "before": {"queries": _unit_frames(queries).cpu().numpy(),
                   "prototypes": _unit_frames(protos).cpu().numpy(),
                   "distances": before.cpu().numpy()},
        "after": {"queries": _unit_frames(f_q[targets, m_index]).cpu().numpy(),  # (M, T*C)
                  "prototypes": _unit_frames(proto_after).cpu().numpy(),  # (N, T*C)
                  "distances": record["distances"].float().cpu().numpy()},
    }


def own_other_ratio(distances: list[np.ndarray], targets: list[np.ndarray]) -> dict:
    """Mean distance of queries to their own prototype over mean distance to the others
    (below 1: queries sit nearer their own class), and nearest-prototype accuracy (percent)."""
    own, other, correct = [], [], []
    for d, y in zip(distances, targets):  # d (N, M), y (M,)
        m = np.arange(d.shape[1])
        own.append(d[y, m])
        other.append((d.sum(0) - d[y, m]) / (d.shape[0] - 1))
        correct.append(d.argmin(0) == y)
    own, other = np.concatenate(own), np.concatenate(other)
    return {"ratio": float(own.mean() / other.mean()), "own": float(own.mean()),
            "other": float(other.mean()),
            "accuracy": float(100.0 * np.concatenate(correct).mean())}


def tsne_2d(points: np.ndarray, seed: int, perplexity: float) -> np.ndarray:
    """(n, 2) t-SNE embedding (scikit-learn, PCA init, seeded)."""
    from sklearn.manifold import TSNE

    perplexity = float(min(perplexity, max(2.0, (len(points) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                learning_rate="auto").fit_transform(points.astype(np.float32))


def plot_embedding(panels: list[dict], class_names: list[str], path: Path, title: str) -> None:
    """Paper Fig. 8: side-by-side t-SNE panels, queries as circles, prototypes as triangles,
    one colour per class."""
    labels = sorted({int(c) for p in panels for c in np.concatenate([p["q_cls"], p["p_cls"]])})
    names = ("tab10",) if len(labels) <= 10 else ("tab20", "tab20b", "tab20c")
    palette = [rgb for name in names for rgb in matplotlib.colormaps[name].colors]  # 10 or 60
    color = {c: palette[i % len(palette)] for i, c in enumerate(labels)}
    fig = Figure(figsize=(5.2 * len(panels) + 1.8, 5.0), dpi=120)
    axes = fig.subplots(1, len(panels))
    for ax, panel in zip(np.atleast_1d(axes), panels):
        q, p = panel["xy"][:len(panel["q_cls"])], panel["xy"][len(panel["q_cls"]):]
        ax.scatter(q[:, 0], q[:, 1], c=[color[int(c)] for c in panel["q_cls"]], marker="o",
                   s=18, alpha=0.75, linewidths=0)
        ax.scatter(p[:, 0], p[:, 1], c=[color[int(c)] for c in panel["p_cls"]], marker="^",
                   s=70, edgecolors="black", linewidths=0.7)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], marker="o", linestyle="", color=color[c],
                      label=class_names[c]) for c in labels]
    handles += [Line2D([], [], marker="o", linestyle="", color="gray", label="query"),
                Line2D([], [], marker="^", linestyle="", color="gray",
                       markeredgecolor="black", label="prototype")]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / (5.2 * len(panels) + 1.8), 1))
    fig.savefig(path)


def run_embedding(cache: FeatureCache, head, out_dir: str, cfg: EmbeddingConfig,
                  device: torch.device, head_name: str, progress: bool = True) -> dict:
    """Embed queries and prototypes of ``cfg.episodes`` episodes before / after ``head``; write
    embedding.json and embedding_tsne.png into ``out_dir``. Returns the JSON payload."""
    check_writable(out_dir, "folder", "--out")  # before the work, not after it
    from align.episodes import EpisodeSampler, Stream

    sampler = EpisodeSampler(cache, cfg.split, way=cfg.way, shot=cfg.shot, queries=cfg.queries,
                             seed=cfg.seed, stream=Stream.TEST)
    head = head.to(device).eval()
    parts = []
    for episode in tqdm(sampler.episodes(0, cfg.episodes), desc="embedding", unit="ep",
                        disable=not progress, leave=False):
        rows = np.concatenate([episode.support, episode.query])
        maps = torch.from_numpy(cache.read_rows(rows)).to(device).float()  # (S+M, C, T, H, W)
        part = embed_episode(head, maps[:len(episode.support)], maps[len(episode.support):],
                             episode.way, episode.shot)
        part["classes"] = episode.classes
        parts.append(part)
    stats, panels = {}, []
    for stage in ("before", "after"):
        stats[stage] = own_other_ratio([p[stage]["distances"] for p in parts],
                                       [p["targets"] for p in parts])
        points = np.concatenate([p[stage]["queries"] for p in parts]
                                + [p[stage]["prototypes"] for p in parts])
        panels.append({
            "xy": tsne_2d(points, cfg.seed, cfg.perplexity),
            "q_cls": np.concatenate([p["classes"][p["targets"]] for p in parts]),
            "p_cls": np.concatenate([p["classes"] for p in parts]),
            "title": (f"{'before' if stage == 'before' else 'after'} alignment"
                      f"{' (pooled raw maps)' if stage == 'before' else f' ({head_name})'}\n"
                      f"own / other prototype distance {stats[stage]['ratio']:.3f}"),
        })
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "embedding.json", "figure": out / "embedding_tsne.png"}
    title = (f"{Path(str(cache.path).rstrip('/')).name} {cfg.split}: {cfg.episodes} episodes, "
             f"{cfg.way}-way {cfg.shot}-shot, {cfg.queries} queries per class")
    plot_embedding(panels, cache.classes, files["figure"], title)
    summary = {
        "cache": str(cache.path),
        "head": head_name,
        **asdict(cfg),
        "ratio_before": stats["before"]["ratio"],
        "ratio_after": stats["after"]["ratio"],
        "before": stats["before"],
        "after": stats["after"],
        "ratio_definition": ("mean over queries of the distance to their own class's prototype "
                             "over the mean distance to the other prototypes; distance = "
                             "sum_t (1 - cos) of per-frame features (before: spatial means of the "
                             "raw maps, prototype = mean over shots; after: the head's pair "
                             "features f_s, f_q)"),
        "points": ("queries: f_q of the pair with their own class; prototypes: mean over their "
                   "class's queries of f_s; every frame L2-normalised, frames concatenated"),
        "files": {k: str(v) for k, v in files.items()},
    }
    write_json(files["json"], summary)
    return summary


def embedding_command(cfg: EmbeddingConfig, *, checkpoint: str | None, head_kind: str | None,
                      cache_path: str | None, shot: int | None, out_dir: str | None,
                      device: torch.device, way: int | None = None, log=print,
                      allow_other_features: bool = False) -> dict:
    """`analyze embedding`: resolve head and cache as `evaluate` does (and say which), then run.

    With neither ``checkpoint`` nor ``head_kind``: the most recent run's best.pt on its cache;
    ``head_kind`` builds an untrained head (protonet: after = before; ta2n: its initialisation).
    """
    from align.runs import load_head_source, resolve_head_source

    source = resolve_head_source(checkpoint=checkpoint, kind=head_kind, cache=cache_path,
                                 shot=shot, way=way, log=log)
    cfg = replace(cfg, shot=source.shot, way=source.way).check()
    with FeatureCache.open(source.cache) as cache:
        head, _ = load_head_source(source, cache, seed=cfg.seed, untrained=True, log=log,
                                   allow_other_features=allow_other_features)
        if source.checkpoint is not None:
            name = f"{head.kind} {Path(source.checkpoint).name}"
        else:
            name = head.kind if head.training_free else f"{head.kind}, untrained"
        cache_path = source.cache
        return run_embedding(cache, head, out_dir or default_out(cache_path), cfg, device, name)


def format_embedding(summary: dict) -> str:
    """What `analyze embedding` prints."""
    b, a = summary["before"], summary["after"]
    return "\n".join([
        f"episodes   {summary['episodes']} x {summary['way']}-way {summary['shot']}-shot, "
        f"{summary['queries']} queries per class ({summary['split']}, seed {summary['seed']})",
        "own/other  mean query distance to its own prototype over that to the other prototypes "
        "(lower: tighter classes)",
        f"  before   {b['ratio']:.3f}  (own {b['own']:.3f}, other {b['other']:.3f}; "
        f"nearest-prototype accuracy {b['accuracy']:.1f}%)",
        f"  after    {a['ratio']:.3f}  (own {a['own']:.3f}, other {a['other']:.3f}; "
        f"accuracy {a['accuracy']:.1f}%)  {summary['head']}",
        "wrote      " + ", ".join(summary["files"].values()),
    ])
