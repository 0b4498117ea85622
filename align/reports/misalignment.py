"""`python cli.py analyze misalignment` (paper Table 1 and Fig. 2): action start times and the AEM
score of a cache's videos, from linear softmax classifiers of spatially pooled frames (p_t from
frame t, or from frames 0..t), trained on the cache with held-out folds by video.

Figures are drawn on bare matplotlib ``Figure`` objects and saved as PNG (Agg): no display needed,
and pyplot's global state (a notebook's backend) is never touched.
"""

from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from align.reports.configs import MisalignmentConfig  # noqa: F401 (its config, re-exported)
from cache import SPLITS, FeatureCache, UserError
from cache.atomic import write_json
from cache.paths import check_writable

PAPER_AEM = {"UCF101": 0.1653, "HMDB51": 0.3697, "SSv2": 0.6260}
CLASSIFIER_NOTE = (
    "The per-frame classifier here is softmax regression on spatially pooled cached features, "
    "not the paper's TSM: compare these values across caches analysed here, not with the paper's "
    "digits (AEM: UCF101 0.1653, HMDB51 0.3697, SSv2 0.6260)."
)
POOL_BATCH_BYTES = 256 * 2**20  # float32 bytes of full maps read per batch while pooling



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
    check_writable(out_dir, "folder", "--out")  # before the work, not after it
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
