"""``FewShotClassifier``: label a person's clips from a few examples per class.

    clf = FewShotClassifier.from_checkpoint("runs/x/best.pt")     # or .training_free("protonet",..)
    clf.fit({"wave": ["a.mp4", "b.mp4"], "clap": ["c.mp4"]})      # or clf.fit("support/")
    for p in clf.predict(["clip1.mp4", "more-clips/"]):
        print(p.query, p.label, p.probability)

Phase one runs the backbone recipe of the cache the head was trained on (``classify.encode``),
each clip once (``features=``: kept in a clip feature store across runs); phase two scores
every query against every class through evaluate's precompute path with the K rule of
``classify.scoring``. Probabilities are the softmax of the logits (what training's cross-entropy
reads); ``margin`` is the predicted class's probability minus the runner-up's.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from align.checkpoints import load_head_checkpoint
from align.models import Head, build_head, head_class
from align.runs import check_head_fits, latest_run, run_config
from cache import FeatureCache, UserError
from classify.clips import Clip, content_key, is_frame_folder, query_clips, support_clips
from classify.encode import ClipEncoder, Recipe, cache_recipe, describe_recipe, recipe_problems
from classify.scoring import class_logits, explain_class
from extract.decode import DecodeTask, decode_task


@dataclass
class Prediction:
    """One query clip's result.

    Args:
        query: the clip's path.
        label: the predicted class (None when the clip could not be read).
        probability: softmax probability of ``label``.
        runner_up, margin: the second most probable class; probability of ``label`` minus its.
        probabilities: {class: probability}, every support class.
        logits: {class: logit}, minus the head's distance to the class.
        status: "ok" or "failed: <why>".
        truth: the known class (a query folder's sub-folder named like a support class).
        in_support: the same clip (same content) is a support clip: its prediction proves
            nothing.
    """

    query: str
    label: str | None = None
    probability: float | None = None
    runner_up: str | None = None
    margin: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    logits: dict[str, float] = field(default_factory=dict)
    status: str = "ok"
    truth: str | None = None
    in_support: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def correct(self) -> bool | None:
        return None if self.truth is None or not self.ok else self.label == self.truth

    def to_dict(self) -> dict:
        return asdict(self)


def _as_clip(path: str | os.PathLike | Clip, truth: str | None = None) -> Clip:
    if isinstance(path, Clip):
        return path
    return Clip(str(path), "frames" if is_frame_folder(Path(path)) else "file", truth)


def _keys(clips: list[Clip]) -> tuple[list[str | None], dict[str, str]]:
    """Content keys of ``clips`` (None where unreadable) and {path: why} of the unreadable."""
    keys, failed = [], {}
    for clip in clips:
        try:
            keys.append(content_key(clip))
        except OSError as e:
            keys.append(None)
            failed[clip.path] = str(e)
    return keys, failed


class FewShotClassifier:
    """A head and the backbone recipe its features came from, fitted to support clips.

    Args:
        head: the few-shot head (any registered kind).
        encoder: phase one for clips (``ClipEncoder``) with the recipe the head's cache used.
        device: where the head runs.
        amp: bfloat16 autocast on CUDA (as evaluate).
        log: receives warnings and notes, one line each (default: silent).
    """

    def __init__(self, head: Head, encoder: ClipEncoder, *, device: torch.device | str = "cpu",
                 amp: bool = True, log=None):
        self.device = torch.device(device)
        self.head = head.to(self.device).eval()
        self.encoder, self.amp = encoder, amp
        self.log = log or (lambda message: None)
        self.classes: list[str] = []
        self.support_paths: dict[str, list[str]] = {}
        self._support: torch.Tensor | None = None  # (S, C, T, H, W) stored dtype
        self._members: list[list[int]] = []
        self._support_keys: dict[str, str] = {}  # content key -> support clip path
        # maps at hand: the support clips', and the last predict's (explain reuses them)
        self._support_maps: dict[str, np.ndarray] = {}
        self._last_maps: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike | None = None, *,
                        cache: str | os.PathLike | None = None,
                        features: str | os.PathLike | None = None,
                        device: torch.device | str = "cpu", workers: int = 0,
                        amp: bool = True, log=None) -> FewShotClassifier:
        """The head of ``checkpoint`` (None: the latest run's best.pt) with the backbone recipe
        of the cache it was trained on (``cache``: that cache, when it moved); ``features``: a
        clip feature store folder kept across runs."""
        say = log or (lambda message: None)
        if checkpoint is None:
            checkpoint = latest_run()["checkpoint"]
            say(f"checkpoint {checkpoint} (best.pt of the most recent run)")
        if not Path(checkpoint).is_file():
            raise UserError(f"no checkpoint at {checkpoint}")
        head, extra = load_head_checkpoint(checkpoint, map_location="cpu")
        run = run_config(checkpoint)
        trained_on = run.get("train", {}).get("cache") or (extra.get("config") or {}).get("cache")
        path = str(cache or trained_on or "")
        if not path:
            raise UserError(f"{checkpoint} does not say which cache it was trained on; pass "
                            "--cache (the cache whose backbone made its features)")
        if not os.path.exists(path):
            raise UserError(f"--cache {path}: no such cache" if cache else
                            f"the checkpoint's cache {path} is not here (moved?); pass --cache "
                            "with its new place")
        with FeatureCache.open(path) as opened:
            attrs, shape = opened.attrs, opened.shape
            recorded = run.get("cache_attrs")
            if cache is not None and recorded and recipe_problems(cache_recipe(recorded),
                                                                  cache_recipe(attrs)):
                raise UserError(
                    f"--cache {cache} holds features of {describe_recipe(cache_recipe(attrs))},"
                    f" but {checkpoint} was trained on features of "
                    f"{describe_recipe(cache_recipe(recorded))}: pass the cache it was trained on")
            if extra.get("source") == "authors":  # their files record neither T nor H, W
                c, t, h, w = shape
                head, extra = load_head_checkpoint(checkpoint, map_location="cpu", frames=t,
                                                   height=h, width=w)
            check_head_fits(asdict(head.config), opened)
        encoder = ClipEncoder(Recipe.from_cache(attrs, f"cache {path}"), torch.device(device),
                              workers=workers, features=features)
        return cls(head, encoder, device=device, amp=amp, log=log)

    @classmethod
    def training_free(cls, kind: str, *, cache: str | os.PathLike | None = None,
                      backbone: str | None = None, weights: str = "pretrained", frames: int = 8,
                      image_size: int | None = None, features: str | os.PathLike | None = None,
                      device: torch.device | str = "cpu", workers: int = 0, amp: bool = True,
                      log=None) -> FewShotClassifier:
        """A training-free head (``protonet``, ``otam``) on the backbone recipe of ``cache``, or
        on ``backbone`` / ``weights`` / ``frames`` / ``image_size`` (the rest: extract's
        defaults)."""
        if not head_class(kind).training_free:
            raise UserError(f"--head {kind} has trainable parameters: pass --checkpoint")
        if (cache is None) == (backbone is None):
            raise UserError("a training-free head takes --cache (whose backbone it uses) or "
                            "--backbone, one of them")
        if cache is not None:
            with FeatureCache.open(cache) as opened:
                recipe = Recipe.from_cache(opened.attrs, f"cache {cache}")
        else:
            recipe = Recipe.from_options(backbone, weights, frames, image_size)
        encoder = ClipEncoder(recipe, torch.device(device), workers=workers, features=features)
        if encoder.backbone.weights.warning:
            (log or (lambda m: None))(f"warning: {encoder.backbone.weights.warning}")
        c, t, h, w = encoder.shape
        head = build_head(kind, channels=c, frames=t, height=h, width=w, shot=1)
        return cls(head, encoder, device=device, amp=amp, log=log)

    # ------------------------------------------------------------------ fit / predict
    def fit(self, support: dict[str, list] | str | os.PathLike,
            progress: bool = False) -> FewShotClassifier:
        """Learn the classes from support clips: {label: [clip paths]} or a folder with one
        sub-folder per class. A class with no readable clip, or fewer than 2 classes, is
        refused; unreadable clips of other classes are left out with a warning."""
        if isinstance(support, dict):
            given = {str(label): [_as_clip(p, str(label)) for p in paths]
                     for label, paths in support.items()}
        else:
            given = support_clips(support)
        if len(given) < 2:
            raise UserError(f"the support set has {len(given)} class(es) "
                            f"({', '.join(given) or 'none'}); classify needs at least 2")
        labels = [label for label in given for _ in given[label]]  # per clip, in order
        clips = [clip for label in given for clip in given[label]]
        keys, failed = _keys(clips)
        maps, broken = self.encoder.encode({k: c for k, c in zip(keys, clips) if k},
                                           progress=progress)
        failed.update({c.path: broken[k] for k, c in zip(keys, clips) if k in broken})
        for path, why in failed.items():
            self.log(f"warning: support clip {path} is left out: {why}")
        rows, members, paths, seen = [], {label: [] for label in given}, {}, {}
        for label, key, clip in zip(labels, keys, clips):
            if key not in maps:
                continue
            if key in seen:
                self.log(f"warning: support clip {clip.path} is the same clip as {seen[key]}")
            seen.setdefault(key, clip.path)
            members[label].append(len(rows))
            paths.setdefault(label, []).append(clip.path)
            rows.append(maps[key])
        for label, class_clips in given.items():
            if not members[label]:
                reasons = "; ".join(f"{c.path}: {failed.get(c.path, '?')}"
                                    for c in class_clips[:2]) or "the folder holds no clip"
                raise UserError(f"support class {label!r} has no readable clip ({reasons})")
        members = list(members.values())
        self.classes, self._members = list(given), members
        self.support_paths = {label: paths[label] for label in given}
        self._support = torch.from_numpy(np.stack(rows))  # (S, C, T, H, W)
        self._support_keys = seen
        self._support_maps = {k: maps[k] for k in seen}
        self._last_maps = {}
        return self

    def predict(self, queries, progress: bool = False) -> list[Prediction]:
        """One ``Prediction`` per query clip, in order: clip paths and/or folders (searched
        recursively; ``<folder>/<class>/...`` gives the known label ``truth``), or ``Clip``s.
        An unreadable clip is a prediction with status "failed: ..." and no label."""
        self._check_fitted()
        if isinstance(queries, str | os.PathLike):
            queries = [queries]
        if all(isinstance(q, Clip) for q in queries):
            clips = list(queries)
        else:
            clips = query_clips([q.path if isinstance(q, Clip) else q for q in queries],
                                self.classes)
        keys, failed = _keys(clips)
        maps, broken = self._encode({k: c for k, c in zip(keys, clips) if k}, progress)
        self._last_maps = maps
        ok = [i for i, k in enumerate(keys) if k in maps]
        logits = torch.empty(0, len(self.classes))
        if ok:
            query = torch.from_numpy(np.stack([maps[keys[i]] for i in ok]))
            logits = class_logits(self.head, self._support, self._members, query,
                                  device=self.device, amp=self.amp).float()  # (M, N)
        predictions = [Prediction(c.path, truth=c.truth, status=f"failed: "
                                  f"{failed.get(c.path) or broken.get(k, 'unreadable')}")
                       for c, k in zip(clips, keys)]
        for row, i in enumerate(ok):
            predictions[i] = self._prediction(clips[i], logits[row])
            if keys[i] in self._support_keys:
                predictions[i].in_support = True
                self.log(f"warning: query {clips[i].path} is the same clip as support clip "
                         f"{self._support_keys[keys[i]]}: its prediction proves nothing")
        return predictions

    def _encode(self, clips: dict[str, Clip], progress: bool = False
                ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """``encoder.encode`` for the clips whose maps are not at hand (a support clip used as
        a query, a query of the last predict being explained): each clip is run once."""
        at_hand = {}
        for key in clips:
            held = self._support_maps.get(key)
            held = self._last_maps.get(key) if held is None else held
            if held is not None:
                at_hand[key] = held
        maps, failed = self.encoder.encode({k: c for k, c in clips.items() if k not in at_hand},
                                           progress=progress)
        return {**at_hand, **maps}, failed

    def _prediction(self, clip: Clip, logits: torch.Tensor) -> Prediction:
        probs = logits.softmax(-1)  # (N,)
        order = probs.argsort(descending=True).tolist()
        top = order[0]
        second = order[1] if len(order) > 1 else None
        return Prediction(
            clip.path, label=self.classes[top], probability=float(probs[top]),
            runner_up=self.classes[second] if second is not None else None,
            margin=float(probs[top] - probs[second]) if second is not None else None,
            probabilities={c: float(p) for c, p in zip(self.classes, probs)},
            logits={c: float(v) for c, v in zip(self.classes, logits)}, truth=clip.truth)

    def explain(self, query: str | os.PathLike | Clip, label: str | None = None) -> dict:
        """Why ``query`` got its label: the prediction, and the head's ``explain`` record
        (TTM's windows, TC's attention, SC's offsets for TA2N) of the query against ``label``
        (default: the predicted class), with the support clip the record shows."""
        self._check_fitted()
        clip = _as_clip(query)
        key = content_key(clip)
        maps, failed = self._encode({key: clip})
        if key not in maps:
            raise UserError(f"{clip.path} cannot be read: {failed.get(key)}")
        query_maps = torch.from_numpy(maps[key])[None]  # (1, C, T, H, W)
        logits = class_logits(self.head, self._support, self._members, query_maps,
                              device=self.device, amp=self.amp).float()[0]  # (N,)
        prediction = self._prediction(clip, logits)
        label = label or prediction.label
        if label not in self.classes:
            raise UserError(f"{label!r} is not a support class ({', '.join(self.classes)})")
        record, shown = explain_class(self.head, self._support,
                                      self._members[self.classes.index(label)], query_maps,
                                      device=self.device)
        shown_path = [p for c in self.support_paths.values() for p in c][shown]
        return {"prediction": prediction, "label": label, "support_clip": shown_path,
                "record": record, "map_hw": tuple(query_maps.shape[-2:])}

    def frames(self, path: str | os.PathLike) -> np.ndarray:
        """(T, S, S, 3) uint8: the clip's frames as the backbone saw them (for figures)."""
        clip = _as_clip(path)
        cfg = self.encoder.config
        task = DecodeTask(row=0, video_id=clip.path, path=clip.path, kind=clip.kind,
                          frames=cfg.frames, resize=cfg.resize, image_size=cfg.image_size,
                          interpolation=self.encoder.backbone.preprocessing.interpolation)
        errors = []
        for method in ("frames",) if clip.kind == "frames" else ("decord", "pyav"):
            try:
                return decode_task(task, method).views[0].transpose(0, 2, 3, 1)  # (T, S, S, 3)
            except Exception as e:  # a decoder's failure: the next one, then the caller says
                errors.append(f"{method}: {type(e).__name__}: {e}")
        raise UserError(f"{clip.path} does not decode ({'; '.join(errors)})")

    def _check_fitted(self) -> None:
        if self._support is None:
            raise UserError("fit the classifier on support clips first (.fit)")
