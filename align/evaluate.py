"""Evaluation: test episodes -> accuracy with its 95% confidence interval, per-class accuracy,
confusion matrix and a JSON report that says how every number was made.

The interval is the paper's (and the authors' code's): 1.96 x std / sqrt(episodes), over the
per-episode accuracies (std with ddof=0).

With the head fixed, most of an episode's work does not depend on the episode: a head that
``precomputes`` (TA2N's factored path, ProtoNet, OTAM) gets its per-video states once for every
video the episodes use - kept on the device when they fit in half of its free memory, else in
blocks of episodes whose videos fit - and each episode only pays for its pairs,
``batch_episodes`` episodes per call. Other heads get each episode's maps (``forward_episodes``).

``run_episodes`` is shared with training's validation. ``evaluate_command`` is `python cli.py
evaluate`: it resolves the defaults (the latest run's best.pt, recorded in runs/latest.json by
training, on that run's cache and shots) and says which it used.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from align.episodes import Episode, EpisodeSampler, Stream, load_episodes, save_episodes
from align.feed import PRELOAD_CHOICES, Feeder, available_ram
from align.options import DEFAULT_SHOT, DEFAULT_WAY
from align.runs import RUNS_ROOT, load_head_source, resolve_head_source
from cache import FeatureCache, UserError
from cache.atomic import write_json
from cache.features import feature_fingerprint
from cache.options import Range, option
from cache.paths import check_writable
from cache.store import human_bytes

PER_ROW_ATTRS = ("windows", "positions", "exponents")  # synthetic ground truth, one per row
PRECOMPUTE_ROWS = 64  # videos per precompute pass: bounds the activations' memory
STATE_SHARE = 0.5  # states are kept whole when they take at most this share of free memory


@dataclass
class EvalConfig:
    """One evaluation.

    Each field's meaning, default and range is its ``option(...)`` declaration, the text
    ``python cli.py evaluate --help`` shows (cache/options.py). way, shot: N-way K-shot (the
    command's --way / --shots default to the run's, else these); the paper: 5000 episodes, Q = 1.
    """

    way: int = DEFAULT_WAY
    shot: int = DEFAULT_SHOT
    episodes: int = option(5000, range=Range(1))
    queries: int = option(1, range=Range(1))
    split: str = option("test", choices=("train", "val", "test"))
    seed: int = option(0)
    save_episodes: str | None = option(None, metavar="FILE", help="Write the episode list.")
    episodes_from: str | None = option(None, metavar="FILE",
                                       help="Replay an episode list (its split, way, shots and "
                                            "queries win).")
    batch_episodes: int = option(16, range=Range(1),
                                 help="Episodes per scoring call (after the per-video "
                                      "precompute).")
    compile: bool = option(False, help="torch.compile the head (same results).")
    preload: str = option("auto", choices=PRELOAD_CHOICES)
    workers: int = option(4, range=Range(0))
    amp: bool = option(True, negatable=True, help="bfloat16 on CUDA.")


# ------------------------------------------------------------------------------ running episodes
def autocast(device: torch.device, amp: bool):
    """bfloat16 autocast on CUDA when asked; a no-op context elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def sync(device: torch.device) -> None:
    """Wait for the device, so that a timer measures work done, not work queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_episodes(head, feeder: Feeder, episodes: list[Episode], *, device: torch.device,
                 batch_episodes: int = 16, amp: bool = True, desc: str = "evaluate",
                 progress: bool = True, log=None, timing: dict | None = None) -> np.ndarray:
    """(E, way * queries) episode-local predictions of ``head`` (in eval mode) for ``episodes``.

    A head that ``precomputes`` gets its per-video states once for every video the episodes
    use, then ``batch_episodes`` episodes per ``score_episodes`` call; any other head gets the
    maps of ``batch_episodes`` episodes per ``forward_episodes`` call. ``log`` hears where the
    states are kept; ``timing`` receives precompute_s and score_s.
    """
    shapes = {(e.way, e.shot, len(e.query)) for e in episodes}
    if len(shapes) != 1:
        raise UserError(f"episodes of different shapes (way, shots, queries): {sorted(shapes)}")
    batch = max(1, batch_episodes)
    was_training = head.training
    head.eval()
    try:
        with torch.inference_mode():
            run = _predict_from_states if head.precomputes else _predict_from_maps
            return run(head, feeder, episodes, device=device, batch=batch, amp=amp, desc=desc,
                       progress=progress, log=log, timing={} if timing is None else timing)
    finally:
        head.train(was_training)


def _predict_from_maps(head, feeder, episodes, *, device, batch, amp, desc, progress, log,
                       timing) -> np.ndarray:
    """Every episode's maps through ``forward_episodes``, ``batch`` episodes at a time."""
    way, shot, n_support = episodes[0].way, episodes[0].shot, len(episodes[0].support)
    batches = [episodes[i:i + batch] for i in range(0, len(episodes), batch)]
    requests = ((np.concatenate([np.concatenate([e.support, e.query]) for e in b]), None)
                for b in batches)
    preds, start = [], time.perf_counter()
    with tqdm(total=len(episodes), desc=desc, unit="ep", disable=not progress,
              leave=False) as bar:
        for chunk, stacked in zip(batches, feeder.stream(requests)):
            maps = stacked.unflatten(0, (len(chunk), -1))  # (E, S+M, C, T, H, W)
            with autocast(device, amp):
                logits = head.forward_episodes(maps[:, :n_support], maps[:, n_support:], way,
                                               shot)  # (E, M, way)
            preds.append(logits.float().argmax(-1).cpu().numpy())
            bar.update(len(chunk))
    timing.update(precompute_s=0.0, score_s=time.perf_counter() - start)
    return np.concatenate(preds)


def _predict_from_states(head, feeder, episodes, *, device, batch, amp, desc, progress, log,
                         timing) -> np.ndarray:
    """Per-video states once (in blocks when they do not fit), then the episodes' pairs."""
    way, shot = episodes[0].way, episodes[0].shot
    blocks = _state_blocks(head, feeder, episodes, device, amp, shot, desc, log)
    preds, timing["precompute_s"], timing["score_s"] = [], 0.0, 0.0
    with tqdm(total=len(episodes), desc=desc, unit="ep", disable=not progress,
              leave=False) as bar:
        for block, rows in blocks:
            start = time.perf_counter()
            states = compute_states(head, feeder, rows, shot, device=device, amp=amp)
            sync(device)
            timing["precompute_s"] += time.perf_counter() - start
            start = time.perf_counter()
            position = np.full(int(rows.max()) + 1, -1, dtype=np.int64)
            position[rows] = np.arange(len(rows))
            buffers: dict = {}  # reused by every chunk of the block
            for i in range(0, len(block), batch):
                chunk = block[i:i + batch]
                support = _gather(states, position, [e.support for e in chunk], buffers, "s")
                query = _gather(states, position, [e.query for e in chunk], buffers, "q")
                with autocast(device, amp):
                    logits = head.score_episodes(support, query, way, shot)  # (E, M, way)
                preds.append(logits.float().argmax(-1).cpu().numpy())
                bar.update(len(chunk))
            timing["score_s"] += time.perf_counter() - start
    return np.concatenate(preds)


def compute_states(head, feeder: Feeder, rows: np.ndarray, shot: int, *, device: torch.device,
                   amp: bool) -> dict[str, torch.Tensor]:
    """{name: (len(rows), ...)} per-video states of ``rows``, on the device, in the dtype the
    head computes them in (bfloat16 under autocast, float32 otherwise), PRECOMPUTE_ROWS videos
    per pass."""
    chunks = [rows[i:i + PRECOMPUTE_ROWS] for i in range(0, len(rows), PRECOMPUTE_ROWS)]
    states: dict[str, torch.Tensor] = {}
    done = 0
    for maps in feeder.stream((chunk, None) for chunk in chunks):
        with autocast(device, amp):
            part = head.precompute(maps, shot)  # {name: (n, ...)}
        if not states:
            states = {k: torch.empty((len(rows), *v.shape[1:]), dtype=v.dtype, device=v.device)
                      for k, v in part.items()}
        for key, value in part.items():
            states[key][done:done + len(maps)] = value
        done += len(maps)
    return states


def _gather(states: dict, position: np.ndarray, rows: list[np.ndarray], buffers: dict,
            side: str) -> dict[str, torch.Tensor]:
    """States of each episode's ``rows`` stacked: {name: (E, n, ...)}, written into
    ``buffers`` (kept by the caller, one per state and ``side``, valid until the next call).

    Why reuse: a chunk's states are hundreds of MB (5-shot, C = 2048); a fresh CPU buffer
    of that size comes from the OS page by page, which made the copy 3x slower than the copy
    into memory already touched (measured on the 2-core CPU)."""
    any_state = next(iter(states.values()))
    index = torch.from_numpy(position[np.stack(rows)]).to(any_state.device)  # (E, n)
    gathered = {}
    for name, state in states.items():
        buffer = buffers.get((side, name))
        if buffer is None or buffer.shape[0] < index.numel():
            buffer = buffers[(side, name)] = state.new_empty((index.numel(), *state.shape[1:]))
        out = torch.index_select(state, 0, index.flatten(), out=buffer[:index.numel()])
        gathered[name] = out.unflatten(0, tuple(index.shape))
    return gathered


def _state_blocks(head, feeder, episodes, device, amp, shot, desc, log):
    """[(episodes, their unique rows)]: one block when every video's state fits in
    STATE_SHARE of the free memory, else consecutive blocks whose videos fit (a video used by
    two blocks is computed twice). Says which in ``log``."""
    rows = np.unique(np.concatenate([np.concatenate([e.support, e.query]) for e in episodes]))
    probe = compute_states(head, feeder, rows[:1], shot, device=device, amp=amp)
    per_video = sum(v.nbytes for v in probe.values())
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in probe.values()})
    budget = STATE_SHARE * free_memory(device)
    total = per_video * len(rows)
    where = f"on {device.type} in {'/'.join(dtypes)}"
    if total <= budget:
        if log is not None:
            log(f"{desc}: per-video states of {len(rows)} videos ({human_bytes(per_video)} each, "
                f"{human_bytes(total)}) computed once, kept {where}")
        return [(episodes, rows)]
    capacity = max(1, int(budget // per_video))
    blocks, block, seen = [], [], set()
    for e in episodes:
        videos = set(e.support.tolist()) | set(e.query.tolist())
        if block and len(seen | videos) > capacity:
            blocks.append((block, np.asarray(sorted(seen), dtype=np.int64)))
            block, seen = [], set()
        block.append(e)
        seen |= videos
    blocks.append((block, np.asarray(sorted(seen), dtype=np.int64)))
    if log is not None:
        log(f"{desc}: per-video states of {len(rows)} videos ({human_bytes(total)}) exceed "
            f"{human_bytes(budget)}: {len(blocks)} blocks of <= {capacity} videos kept {where}, "
            "videos shared by blocks recomputed")
    return blocks


def free_memory(device: torch.device) -> int:
    """Bytes free on the device (GPU memory, or available RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_ram()


# ------------------------------------------------------------------------------ scoring
def confidence_interval(accuracies: np.ndarray) -> float:
    """The paper's 95% interval of the mean accuracy: 1.96 x std / sqrt(episodes)."""
    accuracies = np.asarray(accuracies, dtype=np.float64)
    return float(1.96 * accuracies.std() / math.sqrt(len(accuracies)))


def score(episodes: list[Episode], preds: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy (percent), CI, per-episode and per-class accuracy, confusion matrix."""
    targets = np.stack([e.query_targets for e in episodes])  # (E, M)
    per_episode = 100.0 * (preds == targets).mean(axis=1)  # (E,)
    true_class = np.stack([e.classes[e.query_targets] for e in episodes])  # (E, M) cache labels
    pred_class = np.stack([e.classes[p] for e, p in zip(episodes, preds)])  # (E, M)
    labels = np.unique(true_class)
    index = {int(c): i for i, c in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(true_class.ravel(), pred_class.ravel()):
        confusion[index[int(t)], index[int(p)]] += 1
    names = [class_names[int(c)] for c in labels]
    per_class = {name: round(100.0 * confusion[i, i] / confusion[i].sum(), 4)
                 for i, name in enumerate(names)}
    return {
        "accuracy": float(per_episode.mean()),
        "ci95": confidence_interval(per_episode),
        "per_class_accuracy": per_class,
        "confusion": {"classes": names, "matrix": confusion.tolist(),
                      "note": "rows: true class, columns: predicted class, counts of queries"},
        "episode_accuracy": [round(float(a), 4) for a in per_episode],
    }


def format_result(way: int, shot: int, split: str, accuracy: float, ci: float,
                  episodes: int) -> str:
    """The paper's format: ``5-way 5-shot test: 89.63 +- 0.27 (5000 episodes)``."""
    return f"{way}-way {shot}-shot {split}: {accuracy:.2f} +- {ci:.2f} ({episodes} episodes)"


def compact_attrs(attrs: dict) -> dict:
    """Cache attributes for reports and run configs, without per-row ground-truth lists."""
    attrs = dict(attrs)
    if isinstance(attrs.get("synthetic"), dict):
        attrs["synthetic"] = {k: v for k, v in attrs["synthetic"].items()
                              if k not in PER_ROW_ATTRS}
    return attrs


# ------------------------------------------------------------------------------ evaluate
def evaluate(head, cache: FeatureCache, cfg: EvalConfig, *, device: torch.device,
             head_config: dict | None = None, checkpoint: str | None = None,
             checkpoint_config: dict | None = None, report: str | None = None,
             progress: bool = True, log=None, requested: EvalConfig | None = None) -> dict:
    """Score ``head`` on ``cfg.episodes`` episodes of ``cache``; write and return the report.

    An episode file's header (split, seed, N, K, Q, count) wins over ``cfg``: the report records
    the config as resolved and, as "requested", ``requested`` (default: ``cfg`` as passed).
    """
    start = time.perf_counter()
    requested = requested or cfg
    if cfg.episodes_from:
        episodes, header = load_episodes(cfg.episodes_from, cache)
        cfg = replace(cfg, split=header["split"], seed=header["seed"], way=header["way"],
                      shot=header["shot"], queries=header["queries"], episodes=len(episodes))
    else:
        sampler = EpisodeSampler(cache, cfg.split, way=cfg.way, shot=cfg.shot,
                                 queries=cfg.queries, seed=cfg.seed, stream=Stream.TEST)
        episodes = sampler.episodes(0, cfg.episodes)
    if cfg.save_episodes:
        save_episodes(cfg.save_episodes, episodes, cache, split=cfg.split, seed=cfg.seed)
    feeder = Feeder(cache, cfg.split, device=device, preload=cfg.preload, workers=cfg.workers,
                    progress=progress)
    if log is not None:
        log(f"{cfg.split:<6} {feeder.reason}")
    head = head.to(device)
    if cfg.compile:
        head.compile_entry_points()
    loop_start, timing = time.perf_counter(), {}
    preds = run_episodes(head, feeder, episodes, device=device, amp=cfg.amp,
                         batch_episodes=cfg.batch_episodes, progress=progress, log=log,
                         timing=timing)
    loop_time = time.perf_counter() - loop_start
    result = score(episodes, preds, cache.classes)
    summary = format_result(cfg.way, cfg.shot, cfg.split, result["accuracy"], result["ci95"],
                            len(episodes))
    out = {
        "summary": summary,
        **{k: result[k] for k in ("accuracy", "ci95")},
        "episodes": len(episodes),
        **{k: v for k, v in asdict(cfg).items() if k != "episodes"},
        "requested": asdict(requested),
        "device": str(device),
        "preload": feeder.reason,
        "head": head_config,
        "checkpoint": checkpoint,
        "checkpoint_config": checkpoint_config,
        "cache": {"path": cache.path, "shape": list(cache.shape),
                  "attrs": compact_attrs(cache.attrs)},
        # which features were scored, and whether they are the ones the head was trained on
        "features": (checkpoint_config or {}).get("features") or {
            "trained_on": None, "scored_on": feature_fingerprint(cache.attrs, cache.path),
            "warning": None},
        "wall_time_s": round(time.perf_counter() - start, 3),
        "episode_time_s": round(loop_time, 3),
        "precompute_s": round(timing["precompute_s"], 3),
        "episodes_per_s": round(len(episodes) / loop_time, 3) if loop_time > 0 else None,
        **{k: result[k] for k in ("per_class_accuracy", "confusion", "episode_accuracy")},
    }
    if report:
        out["report"] = str(report)
        write_json(report, out)
    return out


# ------------------------------------------------------------------------------ the command
def evaluate_command(cfg: EvalConfig, *, checkpoint: str | None, head_kind: str | None,
                     cache_path: str | None, shot: int | None, device: torch.device,
                     way: int | None = None,
                     report: str | None, log=print, progress: bool = True,
                     allow_other_features: bool = False) -> dict:
    """`python cli.py evaluate`: resolve the defaults (and say which), load the head, evaluate.

    With neither ``checkpoint`` nor ``head_kind``, the most recent run's best.pt on that run's
    cache, shots and way (``way`` None: the run's, else 5); a training-free ``head_kind``
    (protonet, otam) needs no checkpoint.
    """
    source = resolve_head_source(checkpoint=checkpoint, kind=head_kind, cache=cache_path,
                                 shot=shot, way=way, episodes_from=cfg.episodes_from, log=log)
    requested, cfg = cfg, replace(cfg, shot=source.shot, way=source.way)
    with FeatureCache.open(source.cache) as cache:
        head, facts = load_head_source(source, cache, allow_other_features=allow_other_features,
                                       log=log)
        head_config = asdict(head.config)
        if report is None:
            report = default_report_path(cfg, source.checkpoint, head.kind,
                                         cache.attrs.get("dataset", "cache"))
        check_writable(report, "file", "--report")  # before the work, not after it
        if cfg.save_episodes:
            check_writable(cfg.save_episodes, "file", "--save-episodes")
        return evaluate(head, cache, cfg, device=device, head_config=head_config,
                        checkpoint=source.checkpoint, checkpoint_config=facts,
                        report=report, progress=progress, log=log, requested=requested)


def default_report_path(cfg: EvalConfig, checkpoint: str | None, kind: str, dataset: str) -> str:
    """Next to the checkpoint, or under runs/ for a training-free head."""
    name = f"{cfg.split}-{cfg.way}way-{cfg.shot}shot-{cfg.episodes}ep-seed{cfg.seed}"
    if cfg.episodes_from:
        name = f"{cfg.split}-{Path(cfg.episodes_from).stem}"
    if checkpoint is not None:
        return str(Path(checkpoint).parent / f"eval-{Path(checkpoint).stem}-{name}.json")
    return str(RUNS_ROOT / f"eval-{dataset}-{kind}-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
