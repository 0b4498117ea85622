"""Analyses behind `python cli.py analyze`: how misaligned a cache's videos are, what a head's
alignment does to the features, and which classes one evaluation report gains over another.

    misalignment   paper Table 1 and Fig. 2: action start times and the AEM score, from linear
                   classifiers of spatially pooled frames (p_t from frame t, or from frames
                   0..t), trained on the cache with held-out folds by video
    embedding      paper Fig. 8: t-SNE of queries and prototypes before / after a head's alignment
    compare        paper Fig. 9: sorted per-class accuracy gain of one evaluation report over
                   another on the same episodes

Each ``run_*`` function writes its JSON and PNG files into an output folder and returns a summary
dict that the CLI prints. Figures are drawn on bare matplotlib ``Figure`` objects and saved as
PNG (Agg): no display needed, and pyplot's global state (a notebook's backend) is never touched.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tqdm import tqdm

from cache import SPLITS, FeatureCache, UserError
from cache.atomic import write_json

PAPER_AEM = {"UCF101": 0.1653, "HMDB51": 0.3697, "SSv2": 0.6260}
CLASSIFIER_NOTE = (
    "The per-frame classifier here is softmax regression on spatially pooled cached features, "
    "not the paper's TSM: compare these values across caches analysed here, not with the paper's "
    "digits (AEM: UCF101 0.1653, HMDB51 0.3697, SSv2 0.6260)."
)
POOL_BATCH_BYTES = 256 * 2**20  # float32 bytes of full maps read per batch while pooling


def default_out(path: str) -> str:
    """Where `analyze` writes when no --out is given: runs/analyze-<cache or report name>."""
    return str(Path("runs") / f"analyze-{Path(str(path).rstrip('/')).stem}")


def _select_rows(cache: FeatureCache, split: str) -> np.ndarray:
    """Done rows of one split, or of every split for "all"."""
    if split != "all" and split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose all or one of {', '.join(SPLITS)}")
    rows = cache.rows(None if split == "all" else split)
    if len(rows) == 0:
        raise UserError(f"{cache.path}: no done rows in split {split!r}")
    return rows


# ============================================================================ misalignment
READOUTS = ("frame", "online")


@dataclass
class MisalignmentConfig:
    """How `analyze misalignment` measures start times and AEM.

    Args:
        split: "all" (every done row) or one split name.
        readout: what p_t sees. "frame": frame t alone, one linear map shared by all frames (the
            paper's per-frame reading; right when single frames identify the class). "online":
            frames 0..t, a linear map per frame index whose evidence adds up over time, so the
            order of what was shown counts (needed when classes differ only in temporal order,
            as in the synthetic cache, where single frames are uninformative by design).
        folds: k of the k-fold split by video; each video is scored by a classifier that never
            saw it.
        seed: draws the folds.
        weight_decay: L2 penalty of the softmax regression (on standardised features).
        max_iter: L-BFGS iterations per fold.
        threshold: a frame "shows" the action when its true-class probability reaches this.
    """

    split: str = "all"
    readout: str = "frame"
    folds: int = 5
    seed: int = 0
    weight_decay: float = 1e-2
    max_iter: int = 100
    threshold: float = 0.5


def pooled_frame_features(cache: FeatureCache, rows: np.ndarray,
                          desc: str = "pooling") -> np.ndarray:
    """(n, T, C) float32 spatial means of the given rows, read in batches of bounded size.

    Only the pooled features stay in memory, so caches far larger than RAM work.
    """
    c, t, h, w = cache.shape
    batch = max(1, POOL_BATCH_BYTES // (c * t * h * w * 4))
    out = np.empty((len(rows), t, c), dtype=np.float32)
    for start in tqdm(range(0, len(rows), batch), desc=desc, unit="batch", leave=False):
        maps = cache.read_rows(rows[start:start + batch])  # (b, C, T, H, W) stored dtype
        pooled = maps.mean(axis=(3, 4), dtype=np.float32)  # (b, C, T)
        out[start:start + len(pooled)] = pooled.transpose(0, 2, 1)  # (b, T, C)
    return out


def video_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per video, stratified by class: every fold holds about 1/folds of each class."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        offset = int(rng.integers(folds))  # small classes do not all land in fold 0
        fold[members] = (np.arange(len(members)) + offset) % folds
    return fold


def frame_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Logits of every frame. x: (n, T, C); weight (C, K) for "frame", (T, C, K) for "online"."""
    if weight.dim() == 2:
        return x @ weight + bias  # (n, T, K)
    evidence = torch.einsum("ntc,tck->ntk", x, weight)  # (n, T, K) what frame t adds
    return evidence.cumsum(1) + bias  # (n, T, K) everything seen up to t


def fit_softmax(x: torch.Tensor, y: torch.Tensor, num_classes: int,
                 cfg: MisalignmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax regression of every frame on its video's label, by full-batch L-BFGS
    (deterministic). x: (n, T, C) standardised, y: (n,)."""
    n, t, c = x.shape
    shape = (c, num_classes) if cfg.readout == "frame" else (t, c, num_classes)
    weight = torch.zeros(shape, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    optim = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=cfg.max_iter, history_size=20,
                              tolerance_grad=1e-6, line_search_fn="strong_wolfe")
    targets = y.repeat_interleave(t)  # (n * T,) every frame carries its video's label

    def closure():
        optim.zero_grad()
        logits = frame_logits(x, weight, bias)  # (n, T, K)
        loss = torch.nn.functional.cross_entropy(logits.reshape(n * t, -1), targets)
        loss = loss + 0.5 * cfg.weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optim.step(closure)
    return weight.detach(), bias.detach()


def heldout_frame_probabilities(frames: np.ndarray, labels: np.ndarray, num_classes: int,
                                cfg: MisalignmentConfig, device: torch.device) -> np.ndarray:
    """(n, T, K) class probabilities of every frame, each video scored by a model that never saw it.

    Every frame is one training sample labelled with its video's class (the paper's classifier is
    also trained on whole-video labels and read out frame by frame).
    """
    if cfg.readout not in READOUTS:
        raise UserError(f"unknown readout {cfg.readout!r}; choose one of {', '.join(READOUTS)}")
    if cfg.folds < 2:
        raise UserError("--folds must be at least 2 (no video may score itself)")
    n, t, c = frames.shape
    if n < cfg.folds:
        raise UserError(f"{n} videos cannot be split into {cfg.folds} folds")
    fold = video_folds(labels, cfg.folds, cfg.seed)
    x_all = torch.from_numpy(frames).to(device)  # (n, T, C)
    y_all = torch.from_numpy(labels.astype(np.int64)).to(device)  # (n,)
    probs = np.empty((n, t, num_classes), dtype=np.float32)
    for k in tqdm(range(cfg.folds), desc="folds", unit="fold", leave=False):
        train = torch.from_numpy(np.flatnonzero(fold != k)).to(device)
        test = torch.from_numpy(np.flatnonzero(fold == k)).to(device)
        x_train = x_all[train]  # (n_train, T, C)
        mean = x_train.mean((0, 1))  # (C,)
        std = x_train.std((0, 1)).clamp_min(1e-6)  # (C,)
        weight, bias = fit_softmax((x_train - mean) / std, y_all[train], num_classes, cfg)
        with torch.no_grad():
            logits = frame_logits((x_all[test] - mean) / std, weight, bias)  # (n_test, T, K)
        probs[test.cpu().numpy()] = logits.softmax(-1).cpu().numpy()
    return probs


def start_times(p_true: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """First frame index (0-based) whose true-class probability reaches ``threshold``; -1 if none.

    "p_t >= 0.5 while all earlier p < 0.5" is exactly the first crossing. p_true: (n, T).
    """
    reached = p_true >= threshold  # (n, T)
    return np.where(reached.any(1), reached.argmax(1), -1)


def aem_score(p_true: np.ndarray) -> float:
    """Mean of 1 - cos(P_i, P_j) over all ordered pairs i != j of probability sequences (n, T).

    Uses sum_{i,j} cos(P_i, P_j) = |sum_i P_i/|P_i||^2, so it is O(n T), not O(n^2). The paper's
    normaliser M = 2 v (v - 1) would halve this mean; averaging over the v (v - 1) ordered pairs
    keeps the score in [0, 1] for probabilities (1 - cos of non-negative vectors).
    """
    n = len(p_true)
    if n < 2:
        raise UserError("AEM needs at least two videos")
    p = p_true.astype(np.float64)
    unit = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)  # (n, T)
    total = unit.sum(0)
    cos_sum = total @ total - (unit * unit).sum()  # off-diagonal pairs only
    return float(1.0 - cos_sum / (n * (n - 1)))


def plot_start_times(starts: np.ndarray, frames: int, path: Path, title: str,
                     threshold: float = 0.5) -> None:
    """Paper Fig. 2: share of videos per start frame, plus a bar for videos that never start."""
    counts = np.bincount(starts[starts >= 0], minlength=frames)
    never = int((starts < 0).sum())
    share = np.append(counts, never) / max(len(starts), 1)
    labels = [str(t) for t in range(frames)] + ["never"]
    fig = Figure(figsize=(max(5.0, 0.5 * len(labels) + 2), 3.8), dpi=120)
    ax = fig.subplots()
    colors = ["tab:blue"] * frames + ["tab:gray"]
    ax.bar(range(len(labels)), share, color=colors)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(f"action start frame t (0-based; first p_t >= {threshold:g})")
    ax.set_ylabel("share of videos")
    ax.set_ylim(0, max(1e-3, share.max()) * 1.15)
    ax.set_title(title, fontsize=10)
    for i, s in enumerate(share):
        if s > 0:
            ax.text(i, s, f"{s:.0%}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _classifier_quality(probs: np.ndarray, labels: np.ndarray, readout: str) -> dict:
    """Held-out accuracy per frame and per video next to chance (percent, as in evaluation
    reports), so that a weak classifier is visible."""
    frame_acc = (probs.argmax(-1) == labels[:, None]).mean()
    if readout == "online":
        video_scores = probs[:, -1]  # (n, K) the last frame has seen the whole video
    else:
        video_scores = np.log(probs + 1e-12).sum(1)  # (n, K) product of frame probabilities
    return {"heldout_frame_accuracy": float(100 * frame_acc),
            "heldout_video_accuracy": float(100 * (video_scores.argmax(-1) == labels).mean()),
            "chance": 100.0 / probs.shape[-1], "accuracy_units": "percent"}


def _start_summary(starts: np.ndarray, frames: int) -> dict:
    started = starts[starts >= 0]
    return {
        "frame_indexing": "0-based",
        "histogram": np.bincount(started, minlength=frames).tolist(),
        "never_reached": int((starts < 0).sum()),
        "mean": float(started.mean()) if len(started) else None,
        "std": float(started.std()) if len(started) else None,
    }


def run_misalignment(cache_path: str, out_dir: str, cfg: MisalignmentConfig,
                     device: torch.device) -> dict:
    """Measure start times and AEM of a cache; write misalignment.json, a per-video CSV
    (misalignment_videos.csv: start and p_t of every video) and the start-time histogram
    (misalignment_start_times.png) into ``out_dir``. Returns the JSON payload."""
    with FeatureCache.open(cache_path) as cache:
        rows = _select_rows(cache, cfg.split)
        labels = cache.labels[rows]
        video_ids = cache.video_ids[rows]
        classes = cache.classes
        frames = pooled_frame_features(cache, rows)  # (n, T, C)
    present = np.unique(labels)
    if len(present) < 2:
        raise UserError("the misalignment classifier needs at least two classes")
    dense = np.searchsorted(present, labels)  # the classifier covers the classes present
    probs = heldout_frame_probabilities(frames, dense, len(present), cfg, device)  # (n, T, K)
    p_true = np.take_along_axis(probs, dense[:, None, None], axis=2)[..., 0]  # (n, T)
    starts = start_times(p_true, cfg.threshold)
    aem = aem_score(p_true)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "misalignment.json", "videos_csv": out / "misalignment_videos.csv",
             "histogram": out / "misalignment_start_times.png"}
    summary = {
        "cache": str(cache_path),
        "split": cfg.split,
        "videos": int(len(rows)),
        "classes": int(len(present)),
        "frames": int(frames.shape[1]),
        "aem": aem,
        "aem_normalisation": "mean over the v(v-1) ordered pairs i != j",
        "start_time": _start_summary(starts, frames.shape[1]),
        "classifier": {"kind": f"softmax regression on spatially pooled frame features, "
                               f"{cfg.readout} readout (L-BFGS)",
                       **_classifier_quality(probs, dense, cfg.readout), **asdict(cfg)},
        "note": CLASSIFIER_NOTE,
        "paper_aem": PAPER_AEM,
        "files": {k: str(v) for k, v in files.items()},
    }
    _write_video_csv(files["videos_csv"], video_ids, [classes[i] for i in labels], starts, p_true)
    title = (f"{Path(str(cache_path).rstrip('/')).name} ({cfg.split}, {cfg.readout} readout)\n"
             f"action start time of {len(rows)} videos, AEM {aem:.4f}")
    plot_start_times(starts, frames.shape[1], files["histogram"], title, cfg.threshold)
    write_json(files["json"], summary)
    return summary


def _write_video_csv(path: Path, video_ids, class_names, starts, p_true) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "class", "start"] + [f"p{t}" for t in range(p_true.shape[1])])
        for vid, name, start, p in zip(video_ids, class_names, starts, p_true):
            writer.writerow([vid, name, int(start)] + [f"{v:.4f}" for v in p])


def format_misalignment(summary: dict) -> str:
    """What `analyze misalignment` prints."""
    st, clf, t = summary["start_time"], summary["classifier"], summary["frames"]
    share = np.asarray(st["histogram"], dtype=float) / summary["videos"]
    lines = [
        f"videos     {summary['videos']} ({summary['classes']} classes, split {summary['split']}, "
        f"T={t})",
        f"classifier {clf['readout']} readout, held-out accuracy "
        f"{clf['heldout_frame_accuracy']:.1f}% per frame, "
        f"{clf['heldout_video_accuracy']:.1f}% per video (chance {clf['chance']:.1f}%, "
        f"{clf['folds']} folds by video)",
    ]
    if clf["heldout_frame_accuracy"] < 1.5 * clf["chance"]:
        hint = ("; single frames may not identify these classes (e.g. classes defined by "
                "temporal order): try --readout online" if clf["readout"] == "frame" else "")
        lines.append("warning    the classifier is close to chance: start times and AEM say "
                     "little" + hint)
    lines += [
        f"AEM        {summary['aem']:.4f}  (mean 1 - cos over ordered video pairs i != j)",
        "start time " + "  ".join(f"t={i}:{s:.0%}" for i, s in enumerate(share)),
    ]
    if st["mean"] is not None:
        lines.append(f"           mean {st['mean']:.2f} +- {st['std']:.2f} frames (0-based)")
    lines.append(f"           {st['never_reached']} of {summary['videos']} videos never reach "
                 f"p >= {clf['threshold']} (counted apart, not in the start-time statistics)")
    if st["never_reached"] > summary["videos"] / 2:
        lines.append("warning    most videos never reach the threshold: the classifier is rarely "
                     "confident here, so the start times describe only the videos it names; AEM "
                     "still compares the p_t of all videos")
    lines.append("note       " + summary["note"])
    lines.append("wrote      " + ", ".join(summary["files"].values()))
    return "\n".join(lines)


# ============================================================================ embedding
@dataclass
class EmbeddingConfig:
    """Which episodes `analyze embedding` draws and how it embeds them.

    Args:
        split: the split the episodes come from.
        way, shot, queries: N-way K-shot with Q queries per class.
        episodes: how many episodes (every one adds way*queries circles and way triangles).
        seed: draws the episodes (the evaluation stream: the same episodes as the first ones of
            `evaluate --seed`) and seeds t-SNE.
        perplexity: t-SNE perplexity (capped for small point sets).
    """

    split: str = "test"
    way: int = 5
    shot: int = 1
    queries: int = 5
    episodes: int = 10
    seed: int = 0
    perplexity: float = 30.0


def _unit_frames(x: torch.Tensor) -> torch.Tensor:
    """Each frame scaled to unit length, then (..., T, C) flattened: the squared Euclidean
    distance of two such vectors is twice their frame-wise cosine distance, so t-SNE sees the
    heads' metric."""
    return torch.nn.functional.normalize(x, dim=-1).flatten(-2)  # (..., T*C)


def frame_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_t (1 - cos(a[..., t, :], b[..., t, :])) for (..., T, C) features: the heads' distance."""
    return (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).sum(-1)


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
    before = frame_distance(protos[:, None], queries[None])  # (N, M)
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
                      device: torch.device, log=print) -> dict:
    """`analyze embedding`: resolve head and cache as `evaluate` does (and say which), then run.

    With neither ``checkpoint`` nor ``head_kind``: the most recent run's best.pt on its cache;
    ``head_kind`` builds an untrained head (protonet: after = before; ta2n: its initialisation).
    """
    from align.runs import load_head_source, resolve_head_source

    source = resolve_head_source(checkpoint=checkpoint, kind=head_kind, cache=cache_path,
                                 shot=shot, log=log)
    cfg.shot = source.shot
    with FeatureCache.open(source.cache) as cache:
        head, _ = load_head_source(source, cache, seed=cfg.seed, untrained=True)
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


# ============================================================================ compare
def class_gains(acc_a: dict[str, float], acc_b: dict[str, float]) -> list[dict]:
    """Per-class accuracy of B minus A, largest gain first (ties by class name).

    Only classes in both reports are compared; the caller says which ones were left out.
    """
    shared = sorted(set(acc_a) & set(acc_b))
    rows = [{"class": c, "a": float(acc_a[c]), "b": float(acc_b[c]),
             "gain": float(acc_b[c]) - float(acc_a[c])} for c in shared]
    return sorted(rows, key=lambda r: (-r["gain"], r["class"]))


def plot_gains(gains: list[dict], path: Path, name_a: str, name_b: str) -> None:
    """Paper Fig. 9: one horizontal bar per class, sorted by gain, largest at the top."""
    height = max(2.5, 0.28 * len(gains) + 1.2)
    fig = Figure(figsize=(7.5, height), dpi=120)
    ax = fig.subplots()
    values = [g["gain"] for g in gains][::-1]  # percent points, as in the reports
    names = [g["class"] for g in gains][::-1]
    colors = ["tab:green" if v >= 0 else "tab:red" for v in values]
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), names, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"per-class accuracy gain (percent points): B - A\nA = {name_a}, B = {name_b}",
                  fontsize=9)
    ax.set_title(f"per-class gain of B over A, {len(gains)} classes, sorted", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


SAME_EPISODES_KEYS = ("split", "way", "shot", "queries", "episodes", "seed", "episodes_from")


def read_report(path: str) -> dict:
    """An `evaluate` JSON report, checked for what `compare` needs."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no report at {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not a JSON report ({e})") from None
    if not isinstance(report, dict) or "per_class_accuracy" not in report:
        raise UserError(f"{path} is not an evaluation report (no per_class_accuracy); write one "
                        f"with `python cli.py evaluate`")
    return report


def episode_mismatch(a: dict, b: dict) -> list[str]:
    """Why two reports cannot have scored the same episodes ([] when nothing says so).

    Sampled episodes are a function of (cache rows, split, way, shot, queries, seed, count);
    replayed ones of the episode file, so the seed of a replay does not matter.
    """
    keys = [k for k in SAME_EPISODES_KEYS if not (k == "seed" and a.get("episodes_from"))]
    diffs = [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    path_a, path_b = (r.get("cache", {}).get("path") for r in (a, b))
    if not a.get("episodes_from") and path_a != path_b:
        diffs.append(f"cache {path_a!r} vs {path_b!r} (sampled episodes depend on the cache's "
                     f"rows; replay one --save-episodes file to compare across caches)")
    return diffs


def _report_name(report: dict, path: str) -> str:
    head = report.get("head") or {}
    kind = head.get("kind", "head")
    if head.get("kind") == "ta2n":
        off = [s for s in ("ttm", "tc", "sc") if head.get(s) is False]
        kind += f" (no {'/'.join(off).upper()})" if off else ""
    return f"{kind} [{Path(path).stem}]"


def run_compare(report_a: str, report_b: str, out_dir: str, top: int = 3,
                allow_different: bool = False) -> dict:
    """Per-class gain of report B over report A (same episodes); write compare.json and
    compare_gains.png into ``out_dir``. Returns the JSON payload."""
    a, b = read_report(report_a), read_report(report_b)
    mismatch = episode_mismatch(a, b)
    if mismatch and not allow_different:
        raise UserError("the reports were not made on the same episodes (" + "; ".join(mismatch)
                        + "); pass --allow-different-episodes to compare anyway")
    gains = class_gains(a["per_class_accuracy"], b["per_class_accuracy"])
    if not gains:
        raise UserError("the reports share no class")
    only = sorted(set(a["per_class_accuracy"]) ^ set(b["per_class_accuracy"]))
    name_a, name_b = _report_name(a, report_a), _report_name(b, report_b)
    paired = None
    ep_a, ep_b = a.get("episode_accuracy"), b.get("episode_accuracy")
    if not mismatch and ep_a and ep_b and len(ep_a) == len(ep_b):
        diff = np.asarray(ep_b, dtype=np.float64) - np.asarray(ep_a, dtype=np.float64)
        paired = {"gain": float(diff.mean()),
                  "ci95": float(1.96 * diff.std() / np.sqrt(len(diff)))}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "compare.json", "figure": out / "compare_gains.png"}
    plot_gains(gains, files["figure"], name_a, name_b)
    summary = {
        "report_a": {"path": str(report_a), "name": name_a, "accuracy": a.get("accuracy"),
                     "ci95": a.get("ci95")},
        "report_b": {"path": str(report_b), "name": name_b, "accuracy": b.get("accuracy"),
                     "ci95": b.get("ci95")},
        "units": "percent (as in the evaluation reports)",
        "same_episodes": not mismatch,
        "mismatch": mismatch,
        "paired_episode_gain": paired,
        "classes": gains,
        "top_gains": [g["class"] for g in gains[:top]],
        "only_in_one_report": only,
        "files": {k: str(v) for k, v in files.items()},
    }
    write_json(files["json"], summary)
    return summary


def format_compare(summary: dict) -> str:
    """What `analyze compare` prints: overall accuracies, the per-class table, the top gains."""
    a, b = summary["report_a"], summary["report_b"]
    lines = []
    if summary["mismatch"]:
        lines.append("warning    NOT the same episodes: " + "; ".join(summary["mismatch"]))
    lines += [f"A          {a['name']}: {a['accuracy']:.2f} +- {a['ci95']:.2f}",
              f"B          {b['name']}: {b['accuracy']:.2f} +- {b['ci95']:.2f}"]
    if summary["paired_episode_gain"]:
        p = summary["paired_episode_gain"]
        lines.append(f"B - A      {p['gain']:+.2f} +- {p['ci95']:.2f} points (paired over the "
                     f"same episodes)")
    width = max(len("class"), *(len(g["class"]) for g in summary["classes"]))
    lines.append(f"{'class':<{width}}  {'A':>7}  {'B':>7}  {'gain':>7}")
    for g in summary["classes"]:
        lines.append(f"{g['class']:<{width}}  {g['a']:7.2f}  {g['b']:7.2f}  {g['gain']:+7.2f}")
    if summary["only_in_one_report"]:
        lines.append(f"left out   classes in only one report: "
                     f"{', '.join(summary['only_in_one_report'])}")
    lines.append(f"most gain  {', '.join(summary['top_gains'])}")
    lines.append("wrote      " + ", ".join(summary["files"].values()))
    return "\n".join(lines)
