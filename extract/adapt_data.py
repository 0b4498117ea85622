"""The videos adaptation trains on: the train split's videos (classes shared with val / test
refused), the seeded held-out slice of every class, and one view per video and epoch decoded
ahead in extract's worker pool and handed back in order.

Training views are the paper's augmentation: a random frame per TSN segment, a random crop of
the resized square and a horizontal flip except on SSv2, drawn from (seed, video, epoch) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cache import UserError
from extract.adapt import HELD_OUT_STREAM, VIEW_STREAM, AdaptConfig
from extract.datasets import (
    VideoRecord,
    dataset_spec,
    find_videos,
    read_split_lines,
    split_list_files,
)
from extract.decode import DecodedVideo, DecodeFailure, DecodePool, DecodeTask
from extract.producer import END, Producer
from extract.sampling import ViewPlan, plan_views, random_view, view_rng


@dataclass
class BaseData:
    """The train split's videos: those trained on, those held out, and the base classes."""

    classes: list[str]
    train: list[VideoRecord]
    held_out: list[VideoRecord]
    missing: list[str]
    labels: dict[str, int]  # video id -> index into classes


def refuse_shared_classes(config: AdaptConfig) -> None:
    """Classes listed in train and in val or test would let the backbone see novel classes."""
    files = split_list_files(config.dataset, config.split_dir)
    names = {s: {line.split("/", 1)[0] for line in read_split_lines(files[s])} for s in files}
    shared = sorted(names["train"] & (names["val"] | names["test"]))
    if shared:
        raise UserError(f"classes {', '.join(shared[:3])}{' ...' if len(shared) > 3 else ''} "
                        "are in the train list and in the val / test lists: adapting on them "
                        "would show the backbone novel classes; make the splits disjoint")


def base_data(config: AdaptConfig) -> BaseData:
    """The train split (only) and its seeded held-out slice: round(held_out x n) videos of every
    class, at least one when held_out > 0 and the class has two videos or more."""
    refuse_shared_classes(config)
    found = find_videos(config.dataset, config.root, splits=("train",),
                        split_dir=config.split_dir, limit=config.limit)
    if any(r.split != "train" for r in found.records):  # the guarantee, checked where it matters
        raise AssertionError("adaptation was handed a video outside the train split")
    if not found.records:
        raise UserError(f"no video of the train list was found under {config.root} "
                        f"({len(found.missing)} listed); check --root")
    rng = np.random.default_rng([config.seed, HELD_OUT_STREAM])
    train, held = [], []
    for label in range(len(found.classes)):
        videos = sorted((r for r in found.records if r.label == label), key=lambda r: r.video_id)
        count = round(config.held_out * len(videos))
        if config.held_out > 0 and len(videos) >= 2:
            count = min(max(count, 1), len(videos) - 1)
        chosen = set(rng.choice(len(videos), size=count, replace=False).tolist())
        held += [v for i, v in enumerate(videos) if i in chosen]
        train += [v for i, v in enumerate(videos) if i not in chosen]
    labels = {r.video_id: r.label for r in found.records}
    return BaseData(found.classes, train, held, found.missing, labels)


@dataclass(frozen=True)
class ViewTask(DecodeTask):
    """One video's single view for adaptation: a training view of ``epoch`` (a random frame per
    segment, random crop, flip), or with ``epoch`` -1 the centre view (held-out scoring)."""

    epoch: int = -1

    def plan(self, n: int) -> list[ViewPlan]:
        if self.epoch < 0:
            return plan_views(n, frames=self.frames, video_id=self.video_id,
                              resize=self.resize, image_size=self.image_size)
        rng = view_rng(self.seed, self.video_id, self.epoch)
        return [random_view(n, self.frames, rng, resize=self.resize, image_size=self.image_size,
                            flip=self.flip)]


def view_tasks(records: list[VideoRecord], config: AdaptConfig, epoch: int,
               interpolation: str) -> list[ViewTask]:
    """Decode tasks in order; a task's ``row`` is its position (results are put back in order)."""
    seed = int(np.random.SeedSequence([config.seed, VIEW_STREAM]).generate_state(1)[0])
    flip = dataset_spec(config.dataset).flip
    return [ViewTask(i, r.video_id, r.path, r.kind, config.frames, 0, seed, config.resize,
                     config.image_size, flip, interpolation, epoch)
            for i, r in enumerate(records)]


class OrderedViews:
    """Decodes tasks ahead in worker processes (extract's pool and producer thread) and hands
    the results back in task order."""

    def __init__(self, tasks: list[ViewTask], workers: int, timeout: float, nice: int,
                 decoder: str = "cpu"):
        pool = DecodePool(workers=workers, timeout=timeout, nice=nice, decoder=decoder)
        self.producer = Producer(pool, tasks, capacity=max(8, 4 * max(workers, 1)))
        self.waiting: dict[int, DecodedVideo | DecodeFailure] = {}
        self.next = 0

    def __enter__(self) -> OrderedViews:
        self.producer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.producer.shutdown()

    def take(self, count: int) -> list[DecodedVideo | DecodeFailure]:
        """The next ``count`` results, in task order."""
        out = []
        while len(out) < count:
            if self.next in self.waiting:
                out.append(self.waiting.pop(self.next))
                self.next += 1
                continue
            item = self.producer.out.get()
            if item is END:
                raise self.producer.error or RuntimeError("the decode pool stopped early")
            self.waiting[item.row] = item
        return out
