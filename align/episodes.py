"""Seeded N-way K-shot episodes over the done rows of one split; save and replay episode lists.

An episode holds ``way`` classes, ``shot`` support videos and ``queries`` query videos per class,
all drawn without replacement, in class-major order (class 0's videos, then class 1's ...). Episode
``i`` of a sampler depends only on ``(seed, stream, i)``, through numpy's PCG64 generator, so the
same seed gives the same episodes on any machine, in any order, and a resumed training run draws
exactly the episodes the killed one would have drawn.

Episode files (``--save-episodes`` / ``--episodes-from``) name videos by ``video_id`` and classes
by name, so a list saved on one cache replays on any cache of the same dataset (another backbone,
another backend) and two heads are compared on exactly the same tasks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np

from align.options import DEFAULT_SHOT, DEFAULT_WAY
from cache import FeatureCache, UserError
from cache.atomic import write_json


class Stream(IntEnum):
    """The independent random streams of one seed: the episodes of each use, and training's
    input dropout. Episode ``i`` of stream ``s`` is a function of (seed, s, i) alone."""

    TRAIN = 0
    VAL = 1
    TEST = 2
    DROPOUT = 3


EPISODE_FILE_FORMAT = "ta2n-episodes"
EPISODE_FILE_VERSION = 1


@dataclass(frozen=True)
class Episode:
    """One few-shot task as cache rows.

    Args:
        classes: (way,) cache label of each episode class, in episode order.
        support: (way * shot,) cache rows, class-major.
        query: (way * queries,) cache rows, class-major.
        support_views, query_views: augmented view index per row (training on a cache with
            ``aug_features``), or None for the cached centre view.
    """

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray
    support_views: np.ndarray | None = None
    query_views: np.ndarray | None = None

    @property
    def way(self) -> int:
        return len(self.classes)

    @property
    def shot(self) -> int:
        return len(self.support) // self.way

    @property
    def queries(self) -> int:
        return len(self.query) // self.way

    @property
    def query_targets(self) -> np.ndarray:
        """(way * queries,) episode-local class index of each query (0 .. way-1)."""
        return np.repeat(np.arange(self.way), self.queries)


class EpisodeSampler:
    """Draws episodes from the done rows of one split of a cache.

    Args:
        cache: the open cache.
        split: "train", "val" or "test".
        way, shot, queries: N, K and Q per class.
        seed: the run's seed; ``stream`` separates independent uses of one seed (training,
            validation, evaluation) so that they never share episodes by accident.
        aug_views: when > 0, every video also gets a random view index in [0, aug_views).
    """

    def __init__(self, cache: FeatureCache, split: str, *, way: int = DEFAULT_WAY,
                 shot: int = DEFAULT_SHOT,
                 queries: int = 1, seed: int = 0, stream: int = 0, aug_views: int = 0):
        if way < 2 or shot < 1 or queries < 1:
            raise UserError(f"an episode needs way >= 2, shot >= 1, queries >= 1 "
                            f"(got way={way}, shot={shot}, queries={queries})")
        self.split, self.way, self.shot, self.queries = split, way, shot, queries
        self.seed, self.stream, self.aug_views = int(seed), int(stream), int(aug_views)
        rows = cache.rows(split)
        labels = cache.labels[rows]
        self.class_names = cache.classes
        self.by_class = {int(c): rows[labels == c] for c in np.unique(labels)}
        self.labels = np.asarray(sorted(self.by_class), dtype=np.int64)
        self._check_possible(cache.path)

    def _check_possible(self, path: str) -> None:
        if len(self.labels) < self.way:
            raise UserError(
                f"{path}: split {self.split!r} has {len(self.labels)} classes with done videos, "
                f"fewer than --way {self.way}")
        need = self.shot + self.queries
        short = [(self.class_names[c], len(r)) for c, r in self.by_class.items() if len(r) < need]
        if short:
            named = ", ".join(f"{name!r} ({n})" for name, n in short[:5])
            more = f" and {len(short) - 5} more" if len(short) > 5 else ""
            raise UserError(
                f"{path}: split {self.split!r}: class {named}{more} has fewer than "
                f"K + Q = {self.shot} + {self.queries} = {need} done videos")

    def episode(self, index: int) -> Episode:
        """Episode ``index``: a pure function of (seed, stream, index)."""
        rng = np.random.default_rng([self.seed, self.stream, int(index)])
        classes = rng.choice(self.labels, size=self.way, replace=False)
        support, query = [], []
        for c in classes:
            picked = rng.choice(self.by_class[int(c)], size=self.shot + self.queries, replace=False)
            support.append(picked[:self.shot])
            query.append(picked[self.shot:])
        support, query = np.concatenate(support), np.concatenate(query)
        if not self.aug_views:
            return Episode(classes, support, query)
        return Episode(classes, support, query,
                       support_views=rng.integers(0, self.aug_views, size=len(support)),
                       query_views=rng.integers(0, self.aug_views, size=len(query)))

    def episodes(self, start: int, count: int) -> list[Episode]:
        return [self.episode(i) for i in range(start, start + count)]


# ------------------------------------------------------------------------------- episode files
def save_episodes(path: str | os.PathLike, episodes: list[Episode], cache: FeatureCache, *,
                  split: str, seed: int) -> None:
    """Write an episode list as JSON (video ids and class names), atomically."""
    ids, names = cache.video_ids, cache.classes
    first = episodes[0]
    payload = {
        "format": EPISODE_FILE_FORMAT,
        "version": EPISODE_FILE_VERSION,
        "split": split,
        "way": first.way,
        "shot": first.shot,
        "queries": first.queries,
        "seed": seed,
        "dataset": cache.attrs.get("dataset"),
        "episodes": [
            {"classes": [names[int(c)] for c in e.classes],
             "support": [str(ids[r]) for r in e.support],
             "query": [str(ids[r]) for r in e.query]}
            for e in episodes
        ],
    }
    write_json(path, payload, indent=None)


def read_episode_file(path: str | os.PathLike) -> dict:
    """The JSON object of an episode file, checked to be one (one-line errors otherwise)."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no episode file at {path}") from None
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{path} is not an episode file ({e})") from None
    if not isinstance(payload, dict) or payload.get("format") != EPISODE_FILE_FORMAT:
        raise UserError(f"{path} is not an episode file (no format {EPISODE_FILE_FORMAT!r})")
    return payload


def episode_header(payload: dict, path: str | os.PathLike) -> dict:
    """split, way, shot, queries, seed, dataset of an episode file, checked: a known split,
    positive integers (an edited header would otherwise fail late, or be trusted)."""
    header = {k: payload.get(k) for k in ("split", "way", "shot", "queries", "seed", "dataset")}
    if header["split"] not in ("train", "val", "test"):
        raise UserError(f"{path}: split is {header['split']!r}; an episode file names train, "
                        "val or test")
    for key, least in (("way", 2), ("shot", 1), ("queries", 1)):
        value = header[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"{path}: {key} is {value!r}; it must be an integer >= {least}")
    if header["seed"] is not None and (isinstance(header["seed"], bool)
                                       or not isinstance(header["seed"], int)):
        raise UserError(f"{path}: seed is {header['seed']!r}; it must be an integer")
    return header


def load_episodes(path: str | os.PathLike, cache: FeatureCache) -> tuple[list[Episode], dict]:
    """Read an episode list written by ``save_episodes`` and map it onto ``cache``'s rows.

    Returns the episodes and the file's header (split, way, shot, queries, seed, dataset).
    """
    payload = read_episode_file(path)
    row_of = {str(v): i for i, v in enumerate(cache.video_ids)}
    label_of = {name: i for i, name in enumerate(cache.classes)}
    done, labels = cache.done, cache.labels

    def rows(videos: list[str]) -> np.ndarray:
        missing = [v for v in videos if v not in row_of or not done[row_of[v]]]
        if missing:
            raise UserError(f"{path}: video {missing[0]!r} is not a done row of {cache.path}")
        return np.asarray([row_of[v] for v in videos], dtype=np.int64)

    header = episode_header(payload, path)
    splits = cache.splits
    episodes = []
    try:
        for i, e in enumerate(payload["episodes"]):
            unknown = [c for c in e["classes"] if c not in label_of]
            if unknown:
                raise UserError(f"{path}: class {unknown[0]!r} is not a class of {cache.path}")
            episode = Episode(np.asarray([label_of[c] for c in e["classes"]], dtype=np.int64),
                              rows(e["support"]), rows(e["query"]))
            check_episode(episode, header, labels, f"{path}: episode {i}")
            elsewhere = [r for r in np.concatenate([episode.support, episode.query])
                         if splits[r] != header["split"]]
            if elsewhere:
                r = int(elsewhere[0])
                raise UserError(f"{path}: episode {i} uses {cache.video_ids[r]}, which belongs "
                                f"to the {splits[r]} split of {cache.path}, not to the "
                                f"{header['split']} split the header names")
            episodes.append(episode)
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path}: not an episode list of this tool (bad entry {exc})") from None
    if not episodes:
        raise UserError(f"{path} holds no episodes")
    return episodes, header


def check_episode(episode: Episode, header: dict, labels: np.ndarray, where: str) -> None:
    """Refuse an episode that disagrees with its file's header (way, shot, queries), reuses a
    video (a query that is also a support video would score itself) or places a video under a
    class it does not belong to."""
    way, shot, queries = header.get("way"), header.get("shot"), header.get("queries")
    sizes = (len(episode.classes), len(episode.support), len(episode.query))
    if (way, way * shot if way and shot else None, way * queries if way and queries else None) \
            != sizes:
        raise UserError(f"{where} has {sizes[0]} classes, {sizes[1]} support and {sizes[2]} "
                        f"query videos; the header says {way}-way {shot}-shot, {queries} "
                        "queries per class")
    videos = np.concatenate([episode.support, episode.query])
    if len(np.unique(videos)) != len(videos):
        raise UserError(f"{where} uses a video twice (a query may not be a support video)")
    if len(np.unique(episode.classes)) != len(episode.classes):
        raise UserError(f"{where} lists a class twice")
    expected = np.concatenate([np.repeat(episode.classes, episode.shot),
                               episode.classes[episode.query_targets]])
    if not np.array_equal(labels[videos], expected):
        raise UserError(f"{where} places a video under a class it does not belong to")
