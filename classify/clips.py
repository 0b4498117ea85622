"""A person's own clips: which files and folders are clips, their labels, their content keys.

A clip is a video file (any of extract's video extensions) or a frame folder (a folder holding
.jpg/.png/... frames, read in natural name order), exactly what ``extract`` reads.

- Support: ``DIR/<class>/<clip>``: one sub-folder per class, its name the label; its clips are
  its video files and its frame folders (other files are ignored).
- Queries: clip files and folders; a folder is searched recursively (a frame folder is one clip,
  not searched further). Clips under ``<query folder>/<class>/`` with ``<class>`` a support class
  have a known label (``truth``), so accuracy can be reported.

Every clip has a content key: the sha256 of its bytes (a frame folder: of its frames' names and
bytes, in order). The key, not the path, names a clip's maps in a feature store, so a clip that
was moved, renamed or copied is found again, an edited clip is never served stale maps, and the
same clip in support and query is recognised whatever it is called.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cache import UserError
from extract.datasets import FRAME_EXTENSIONS, VIDEO_EXTENSIONS, natural_key


@dataclass(frozen=True)
class Clip:
    """One clip: its path, "file" or "frames", and the class it is known to be (or None)."""

    path: str
    kind: str
    truth: str | None = None


def is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def frame_files(folder: Path) -> list[Path]:
    """The frames of a frame folder in natural order (empty when it holds none)."""
    try:
        entries = [e for e in os.scandir(folder) if e.is_file()]
    except OSError:
        return []
    names = [e.name for e in entries
             if e.name.lower().endswith(FRAME_EXTENSIONS) and not e.name.startswith(".")]
    return [folder / n for n in sorted(names, key=natural_key)]


def is_frame_folder(path: Path) -> bool:
    return path.is_dir() and bool(frame_files(path))


def _sorted_children(folder: Path) -> list[Path]:
    try:
        return sorted((p for p in folder.iterdir() if not p.name.startswith(".")),
                      key=lambda p: natural_key(p.name))
    except OSError as e:
        raise UserError(f"cannot list {folder}: {e.strerror or e}") from None


def clips_in(folder: Path, truth: str | None = None, recursive: bool = True) -> list[Clip]:
    """Video files and frame folders under ``folder`` (recursively: sub-folders that are not
    frame folders are searched)."""
    found = []
    for child in _sorted_children(folder):
        if is_video(child):
            found.append(Clip(str(child), "file", truth))
        elif child.is_dir():
            if is_frame_folder(child):
                found.append(Clip(str(child), "frames", truth))
            elif recursive:
                found.extend(clips_in(child, truth, recursive))
    return found


def support_clips(folder: str | os.PathLike) -> dict[str, list[Clip]]:
    """{class: its clips} of a support folder (one sub-folder per class)."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--support {folder}: not a folder (it holds one sub-folder per class)")
    classes = {}
    for child in _sorted_children(root):
        if child.is_dir():
            classes[child.name] = clips_in(child, child.name, recursive=False)
    if not classes:
        raise UserError(f"--support {folder} holds no class sub-folders (expected "
                        f"{folder}/<class>/<clip>)")
    return classes


def query_clips(paths: list[str | os.PathLike], classes: list[str]) -> list[Clip]:
    """The clips of ``--query`` paths in the order given (folders searched recursively); clips
    under ``<folder>/<support class>/`` carry that class as their known label."""
    clips = []
    for given in paths:
        path = Path(given)
        if is_video(path):
            clips.append(Clip(str(path), "file"))
        elif path.is_file():  # named explicitly: the user means it, it fails as a row if unreadable
            clips.append(Clip(str(path), "file"))
        elif is_frame_folder(path):
            clips.append(Clip(str(path), "frames"))
        elif path.is_dir():
            for child in _sorted_children(path):
                truth = child.name if child.is_dir() and child.name in classes else None
                if is_video(child):
                    clips.append(Clip(str(child), "file"))
                elif is_frame_folder(child):
                    clips.append(Clip(str(child), "frames"))
                elif child.is_dir():
                    clips.extend(clips_in(child, truth))
        else:
            raise UserError(f"--query {given}: no such file or folder")
    if not clips:
        raise UserError(f"--query {' '.join(map(str, paths))}: no clip found (video files or "
                        "frame folders)")
    return clips


def content_key(clip: Clip) -> str:
    """sha256 of the clip's content (a frame folder: its frames' names and bytes, in order)."""
    digest = hashlib.sha256()
    files = frame_files(Path(clip.path)) if clip.kind == "frames" else [Path(clip.path)]
    for file in files:
        if clip.kind == "frames":
            digest.update(file.name.encode() + b"\0")
        try:
            with open(file, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError as e:
            raise OSError(f"cannot read {file}: {e.strerror or e}") from None
    return digest.hexdigest()
