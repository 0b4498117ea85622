"""Split lists -> video records: which videos a dataset has, their labels, where they are on disk.

The few-shot split lists are vendored under ``extract/splits/`` (see its README): one video a line,
``<class folder>/<video stem>``. Each dataset is one record of ``cache/datasets.py`` (its split
folder, its layout, its recipes); this module turns the lines of the chosen splits into
``VideoRecord`` s (video id, split, label, path) and lists the videos it cannot find on disk.

Where a line's video is looked for, in order (the first match wins):

- every dataset: ``<root>/<class>/<stem>.<video ext>``, or the frame folder
  ``<root>/<class>/<stem>/``
- a record with ``class_spellings`` (kinetics): also the class folder spelt with spaces or with
  underscores
- a record with ``flat`` (ssv2, ssv2-cmn): first ``<root>/<stem>.<video ext>`` or
  ``<root>/<stem>/``; then as above

A line is ``<class folder>/<video stem>`` inside the root: lines with ``..`` or ``.`` parts or a
leading ``/`` are refused. A line repeated within a list is kept once (with a warning); a line in
two lists, or two lines that find the same file in two splits, are refused, since a video in two
splits could be its own support. Folders that cannot be listed (a symbolic-link loop) are warned
about and their videos count as missing; a looping link in place of a video fails to decode and
is reported for that video alone.

Class names are the class folders of the lines; for SSv2 they are the split-prefixed labels of the
lists (``train8``, ``val3``), which are unique across splits because they carry the split's name.
Labels index the class list: classes of the chosen splits in split order (train, val, test),
sorted naturally within a split, taken from the whole lists so that labels never depend on what
is on disk.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cache import SPLITS, UserError
from cache.datasets import DATASETS, Dataset, video_datasets

SPLITS_DIR = Path(__file__).resolve().parent / "splits"


def dataset_spec(name: str) -> Dataset:
    """The record of a dataset extract and adapt-backbone take (cache/datasets.py)."""
    if name not in video_datasets():
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(video_datasets())}")
    return DATASETS[name]


VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv",
                    ".wmv", ".3gp", ".ogv")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class VideoRecord:
    """One video of a split list, found on disk. ``kind`` is "file" or "frames" (a frame folder)."""

    video_id: str
    split: str
    label: int
    class_name: str
    path: str
    kind: str


@dataclass(frozen=True)
class VideoList:
    """The chosen splits of a dataset: videos found, lines not found, the class list, and
    warnings for the user (duplicate lines kept once, folders that could not be listed)."""

    records: list[VideoRecord]
    missing: list[str]
    classes: list[str]
    warnings: list[str] = field(default_factory=list)
    listed: dict[str, str] = field(default_factory=dict)  # every line of the chosen splits -> split

    def changes_from(self, video_ids, splits) -> list[str]:
        """How these lists differ from the rows of a cache extracted earlier (``video_ids``,
        ``splits``): videos no longer listed, moved to another split, or found now and not in
        the cache (a line added, or a video missing then). Empty when the cache still holds
        what these lists ask for."""
        cached = dict(zip((str(v) for v in video_ids), (str(s) for s in splits)))
        removed = [v for v in cached if v not in self.listed]
        moved = [f"{v} moved from {cached[v]} to {self.listed[v]}" for v in cached
                 if v in self.listed and self.listed[v] != cached[v]]
        added = [r.video_id for r in self.records if r.video_id not in cached]
        changes = moved[:3]
        if removed:
            changes.append(f"{len(removed)} videos of the cache are no longer listed (e.g. "
                           f"{removed[0]})")
        if added:
            changes.append(f"{len(added)} listed videos are not in the cache (e.g. {added[0]})")
        return changes


def natural_key(text: str) -> list:
    """Sort key that orders ``train2`` before ``train10`` and ``img_9`` before ``img_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def split_list_files(dataset: str, split_dir: str | os.PathLike | None) -> dict[str, Path]:
    """The split-list file of each split: the vendored lists, or ``--split-dir`` for custom."""
    spec = dataset_spec(dataset)
    if spec.split_folder is None or split_dir is not None:
        if split_dir is None:
            raise UserError(f"--dataset {dataset} needs --split-dir DIR holding trainlist.txt, "
                            "vallist.txt and testlist.txt")
        folder = Path(split_dir)
        files = {s: folder / f"{s}list.txt" for s in SPLITS}
        if not any(f.exists() for f in files.values()):
            raise UserError(f"{folder} holds none of trainlist.txt, vallist.txt, testlist.txt")
        return files
    folder = SPLITS_DIR / spec.split_folder
    return {s: folder / f"{s}list03.txt" for s in SPLITS}


def read_split_lines(path: Path) -> list[str]:
    """Lines ``<class>/<stem>`` of one split list (a missing custom list is an empty split)."""
    if not path.exists():
        return []
    lines = []
    # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first class
    for number, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "/" not in line:
            raise UserError(f"{path}:{number}: expected '<class>/<stem>', got {line!r}")
        parts = line.replace("\\", "/").split("/")
        if line.startswith(("/", "\\")) or any(part in ("..", ".") for part in parts):
            raise UserError(f"{path}:{number}: {line!r} leaves the dataset folder; split-list "
                            "lines are '<class>/<stem>' inside --root")
        lines.append(line)
    return lines


class _DirIndex:
    """Lists each folder once, so that finding 80k videos costs one ``scandir`` per folder.

    A folder that cannot be listed (a symbolic-link loop, no permission) holds no videos and is
    remembered in ``unreadable``; an entry whose type cannot be read (a looping link) is kept as
    a video, so that its decoding fails and is reported for that video alone.
    """

    def __init__(self):
        self._folders: dict[str, dict[str, tuple[str, str]]] = {}
        self.unreadable: dict[str, str] = {}

    def lookup(self, folder: str, stem: str) -> tuple[str, str] | None:
        """(path, kind) of ``<folder>/<stem>.<video ext>`` or of the frame folder
        ``<folder>/<stem>``."""
        if folder not in self._folders:
            self._folders[folder] = self._scan(folder)
        return self._folders[folder].get(stem)

    def _scan(self, folder: str) -> dict[str, tuple[str, str]]:
        found: dict[str, tuple[str, str, int]] = {}
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as e:  # e.g. ELOOP, EACCES: this folder's videos count as missing
            self.unreadable[folder] = e.strerror or str(e)
            return {}
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            try:
                is_dir = entry.is_dir()
            except OSError:  # a looping link: a video named like it fails to decode, alone
                is_dir = ext.lower() not in VIDEO_EXTENSIONS
            if is_dir:
                found.setdefault(entry.name, (entry.path, "frames", len(VIDEO_EXTENSIONS)))
                continue
            ext = ext.lower()
            if ext in VIDEO_EXTENSIONS:
                rank = VIDEO_EXTENSIONS.index(ext)
                if stem not in found or rank < found[stem][2]:
                    found[stem] = (entry.path, "file", rank)
        return {stem: (path, kind) for stem, (path, kind, _) in found.items()}


def candidate_folders(dataset: str, root: str, class_name: str) -> list[str]:
    """Folders where a line's video may sit, most likely first."""
    spec = dataset_spec(dataset)
    by_class = [os.path.join(root, class_name)]
    if spec.class_spellings:
        for variant in (class_name.replace(" ", "_"), class_name.replace("_", " ")):
            if variant != class_name:
                by_class.append(os.path.join(root, variant))
    return [root, *by_class] if spec.flat else by_class


def list_classes(lines_by_split: dict[str, list[str]]) -> list[str]:
    """Classes in split order, naturally sorted within each split, each once."""
    classes: list[str] = []
    seen: set[str] = set()
    for split in SPLITS:
        names = {line.split("/", 1)[0] for line in lines_by_split.get(split, [])}
        for name in sorted(names - seen, key=natural_key):
            classes.append(name)
            seen.add(name)
    return classes


def explain_missing(dataset: str, root: str | os.PathLike, missing: list[str],
                    show: int = 2) -> str:
    """Why listed videos were not found, for the message: lines that end in a video extension
    (split lines name '<class>/<stem>' without it), and the first paths looked for."""
    root = str(root)
    with_extension = [line for line in missing if line.lower().endswith(VIDEO_EXTENSIONS)]
    hints = []
    if with_extension:
        hints.append(f"split lines name '<class>/<stem>' without extension, and "
                     f"{len(with_extension)} of these end in one (e.g. {with_extension[0]!r})")
    looked = []
    for line in missing[:show]:
        class_name, stem = line.split("/", 1)
        folder = candidate_folders(dataset, root, class_name)[-1]
        looked.append(f"{os.path.join(folder, stem)}{{{','.join(VIDEO_EXTENSIONS[:3])},...}} "
                      "or that frame folder")
    if looked:
        hints.append("looked for " + "; ".join(looked))
    return "; ".join(hints)


class VideoLocator:
    """Finds the file or frame folder of split-list lines under a dataset root."""

    def __init__(self, dataset: str, root: str | os.PathLike):
        self.dataset = dataset
        self.root = str(root)
        self._index = _DirIndex()

    @property
    def unreadable(self) -> dict[str, str]:
        """Folders that could not be listed, and why."""
        return self._index.unreadable

    def locate(self, line: str) -> tuple[str, str] | None:
        """(path, kind) of the line's video, or None when it is not on disk."""
        class_name, stem = line.split("/", 1)
        for folder in candidate_folders(self.dataset, self.root, class_name):
            hit = self._index.lookup(folder, stem)
            if hit:
                return hit
        return None


def find_videos(
    dataset: str,
    root: str | os.PathLike,
    *,
    splits: tuple[str, ...] = SPLITS,
    split_dir: str | os.PathLike | None = None,
    limit: int | None = None,
) -> VideoList:
    """Records of the chosen splits' videos found under ``root``; lines not found are ``missing``.

    Args:
        dataset: a name of ``video_datasets()`` (cache/datasets.py).
        root: the dataset's folder (videos or frame folders).
        splits: which splits to take, in any order (records keep train, val, test order).
        split_dir: folder with trainlist.txt / vallist.txt / testlist.txt (custom, or to override).
        limit: keep only the first ``limit`` videos found per split.
    """
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise UserError(f"unknown split(s) {', '.join(unknown)}; choose from {', '.join(SPLITS)}")
    if not os.path.isdir(root):
        raise UserError(f"dataset folder {root} does not exist; pass --root DIR")
    files = split_list_files(dataset, split_dir)
    all_lines, warnings = _unique_lines({s: read_split_lines(files[s]) for s in SPLITS}, files)
    lines_by_split = {s: all_lines[s] for s in SPLITS if s in splits}
    classes = list_classes(lines_by_split)
    label_of = {name: i for i, name in enumerate(classes)}
    locator = VideoLocator(dataset, root)
    records: list[VideoRecord] = []
    missing: list[str] = []
    line_of_path: dict[str, tuple[str, str]] = {}  # found path -> (split, line)
    for split, lines in lines_by_split.items():
        kept = 0
        for line in lines:
            if limit is not None and kept >= limit:
                break
            hit = locator.locate(line)
            if hit is None:
                missing.append(line)
                continue
            if _seen_path(line_of_path, hit[0], split, line, warnings):
                continue
            class_name = line.split("/", 1)[0]
            records.append(VideoRecord(line, split, label_of[class_name], class_name, *hit))
            kept += 1
    warnings += [f"cannot list {folder} ({why}): its videos count as missing"
                 for folder, why in locator.unreadable.items()]
    listed = {line: split for split, lines in lines_by_split.items() for line in lines}
    return VideoList(records=records, missing=missing, classes=classes, warnings=warnings,
                     listed=listed)


def _unique_lines(lines_by_split: dict[str, list[str]], files: dict[str, Path]
                  ) -> tuple[dict[str, list[str]], list[str]]:
    """Each list's lines with repeats dropped (and a warning saying so); a line in two lists is
    refused: a video in two splits could be its own support, or be tested on after training."""
    split_of: dict[str, str] = {}
    unique: dict[str, list[str]] = {}
    warnings = []
    for split, lines in lines_by_split.items():
        unique[split] = list(dict.fromkeys(lines))
        repeats = len(lines) - len(unique[split])
        if repeats:
            twice = next(line for line, n in Counter(lines).items() if n > 1)
            warnings.append(f"{files[split]}: {repeats} repeated lines kept once (e.g. {twice})")
        for line in unique[split]:
            if line in split_of:
                raise UserError(f"{line} is listed in both the {split_of[line]} and the {split} "
                                f"lists ({files[split_of[line]]}, {files[split]}); a video "
                                "belongs to one split only")
            split_of[line] = split
    return unique, warnings


def _seen_path(line_of_path: dict[str, tuple[str, str]], path: str, split: str, line: str,
               warnings: list[str]) -> bool:
    """Whether another line already found the same file (e.g. Kinetics class folders spelt with
    spaces and with underscores): within a split it is kept once, across splits refused."""
    key = os.path.normpath(path)
    if key not in line_of_path:
        line_of_path[key] = (split, line)
        return False
    other_split, other_line = line_of_path[key]
    if other_split != split:
        raise UserError(f"{other_line} ({other_split}) and {line} ({split}) are the same video "
                        f"{path}; a video belongs to one split only")
    warnings.append(f"{other_line} and {line} are the same video {path}: kept once")
    return True
