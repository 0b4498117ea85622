"""Phase one for a person's clips: the backbone, weights, preprocessing, T and sampling that made a
feature cache, rebuilt from its attributes and run on clips, with the clips' maps optionally kept
in a clip feature store (``--features``) so that a rerun recomputes nothing.

``Recipe`` is what decides a clip's maps (``RECIPE_KEYS``, the part of extract's fingerprint
that concerns one video): read from a cache made by ``extract`` (``Recipe.from_cache``), or
from backbone options for a training-free head (``Recipe.from_options``). ``ClipEncoder`` runs
it the way ``extract`` does - extract's decoder (centre frame of each of T segments, the
backbone's resize filter, centre crop), its batcher and its ``FeatureExtractor`` - so a clip's
maps are those ``extract`` would store for it. A weights file that no longer holds the weights
the cache was made with (its tensors' hash differs) is refused.

The clip feature store is a folder: ``clip-features.json`` (the recipe it holds maps of) and
``part-*.zarr`` feature caches, one per run that computed something, each row a clip named by
its content key (``classify.clips.content_key``). Parts are only ever added: a killed run keeps
the rows it finished (done flags), and nothing is rewritten. A store made with another recipe is
refused in one line naming both.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cache import FeatureCache, UserError
from cache.atomic import write_json
from classify.clips import Clip
from extract.backbones import Backbone
from extract.decode import DecodeFailure, DecodePool, DecodeTask
from extract.output import LEGACY, SAMPLING
from extract.pipeline import prepare_backbone
from extract.plan import ExtractConfig
from extract.producer import Batcher, video_maps

# What decides one clip's maps (extract's FINGERPRINT without the dataset, its video selection
# and the training views).
RECIPE_KEYS = ("backbone", "weights_state_sha256", "frames", "image_size", "resize", "dtype",
               "sampling", "mean", "std", "interpolation", "pool_to")
STORE_FILE = "clip-features.json"
STORE_FORMAT = "ta2n-cache clip features"


def _jsonable(value):
    return json.loads(json.dumps(value))


def describe_recipe(recipe: dict) -> str:
    """One line naming what makes a clip's maps: backbone, weights, T, crop."""
    weights = str(recipe.get("weights_state_sha256") or "?")[:12]
    pool = f", pooled to {recipe['pool_to']}" if recipe.get("pool_to") else ""
    return (f"{recipe.get('backbone')} (weights {weights}), T={recipe.get('frames')}, "
            f"{recipe.get('image_size')} px crop of {recipe.get('resize')}{pool}, "
            f"{recipe.get('dtype')}")


def recipe_problems(have: dict, want: dict) -> list[str]:
    """RECIPE_KEYS whose values differ, as 'key: a vs b'."""
    return [f"{k}: {have.get(k)!r} vs {want.get(k)!r}" for k in RECIPE_KEYS
            if _jsonable(have.get(k)) != _jsonable(want.get(k))]


def cache_recipe(attrs: dict) -> dict:
    """The recipe recorded in a cache's attributes."""
    return {k: _jsonable(attrs.get(k, LEGACY.get(k))) for k in RECIPE_KEYS}


@dataclass
class Recipe:
    """How clips become maps: extract's options (backbone, weights, seed, T, sizes, dtype) and
    where they were read (for messages)."""

    config: ExtractConfig
    source: str
    expected: dict | None = None  # the recipe the maps must match (a cache's), None: any

    @classmethod
    def from_cache(cls, attrs: dict, where: str) -> Recipe:
        """The recipe of a cache made by ``extract`` (its ``extract_config`` and weights)."""
        made = attrs.get("extract_config")
        if not made:
            raise UserError(f"{where} was not made by extract from videos (no extract_config "
                            "attribute, e.g. a synth cache): there is no backbone to run on "
                            "clips; use a cache extracted from videos, or --backbone")
        weights = made.get("weights", "pretrained")
        record = attrs.get("weights") or {}
        if record.get("source") == "file":
            weights = record.get("description") or weights  # the absolute path extract saw
            if not os.path.isfile(weights):
                raise UserError(f"{where} was extracted with the weights file {weights}, which "
                                "is not here; put it back (the features depend on it)")
        config = ExtractConfig(dataset=made.get("dataset", "custom"), root=made.get("root"),
                               backbone=attrs.get("backbone", made.get("backbone")),
                               weights=weights, seed=int(made.get("seed", 0)),
                               frames=int(attrs["frames"]), image_size=attrs.get("image_size"),
                               resize=attrs.get("resize"), pool_to=attrs.get("pool_to"),
                               dtype=attrs.get("dtype", "float16"))
        return cls(config, where, cache_recipe(attrs))

    @classmethod
    def from_options(cls, backbone: str, weights: str = "pretrained", frames: int = 8,
                     image_size: int | None = None, resize: int | None = None,
                     pool_to: int | None = None, seed: int = 0) -> Recipe:
        """A recipe from backbone options (a training-free head without a cache)."""
        config = ExtractConfig(dataset="custom", backbone=backbone, weights=weights,
                               frames=frames, image_size=image_size, resize=resize,
                               pool_to=pool_to, seed=seed)
        return cls(config, f"--backbone {backbone}")


def built_recipe(config: ExtractConfig, backbone: Backbone) -> dict:
    """The recipe of a prepared backbone, in the cache attributes' terms."""
    prep = backbone.preprocessing
    return _jsonable({"backbone": config.backbone,
                      "weights_state_sha256": backbone.weights.state_sha256,
                      "frames": config.frames, "image_size": config.image_size,
                      "resize": config.resize, "dtype": config.dtype, "sampling": SAMPLING,
                      "mean": list(prep.mean), "std": list(prep.std),
                      "interpolation": prep.interpolation, "pool_to": config.pool_to})


class ClipStore:
    """The ``--features`` folder: clip maps by content key, for one recipe (see the module
    docstring). Reading it never changes it; ``part`` adds a part for new clips."""

    def __init__(self, path: str | os.PathLike, recipe: dict):
        self.path, self.recipe = Path(path), recipe
        self.meta = self.path / STORE_FILE
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--features {path} is a file; it names a folder of clip features")
        if self.meta.is_file():
            try:
                stored = json.loads(self.meta.read_text())
            except (OSError, ValueError):
                stored = None
            if not isinstance(stored, dict) or stored.get("format") != STORE_FORMAT:
                raise UserError(f"--features {path}: {STORE_FILE} is not a clip feature store's "
                                "description; choose another folder")
            problems = recipe_problems(stored["recipe"], recipe)
            if problems:
                raise UserError(
                    f"--features {path} holds maps of {describe_recipe(stored['recipe'])}, not "
                    f"of this classifier's {describe_recipe(recipe)} ({problems[0]}); use "
                    "another --features folder")
        elif self.path.is_dir() and any(self.path.iterdir()):
            raise UserError(f"--features {path} is a folder classify did not make (no "
                            f"{STORE_FILE}); it is never written into: choose another")

    def parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.zarr")) if self.path.is_dir() else []

    def lookup(self, keys: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """({key: stored maps (C, T, H, W)} of the ``keys`` any part holds done, {key: why it
        failed} of those an earlier run could not decode: the same content fails again)."""
        wanted, found, failed = set(keys), {}, {}
        for part in self.parts():
            with FeatureCache.open(part) as cache:
                failed.update({k: v for k, v in (cache.attrs.get("failed") or {}).items()
                               if k in wanted})
                rows = [r for r in cache.rows(done_only=True).tolist()
                        if cache.video_ids[r] in wanted and cache.video_ids[r] not in found]
                if rows:
                    maps = cache.read_rows(rows)
                    found.update({str(cache.video_ids[r]): m for r, m in zip(rows, maps)})
        return found, {k: v for k, v in failed.items() if k not in found}

    def part(self, keys: list[str], paths: list[str], shape, dtype: str) -> FeatureCache:
        """A new part with one row per key (none done yet), opened for writing."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.meta.is_file():
            write_json(self.meta, {"format": STORE_FORMAT, "recipe": self.recipe,
                                   "note": "clip maps of `python cli.py classify`, by content "
                                           "sha256; parts are added, never rewritten"})
        stamp, n = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", 0
        while (self.path / f"part-{stamp}-{n}.zarr").exists():
            n += 1
        return FeatureCache.create(
            self.path / f"part-{stamp}-{n}.zarr", video_ids=keys, splits=["test"] * len(keys),
            labels=[0] * len(keys), classes=["clip"], shape=shape, dtype=dtype,
            attrs={"clip_store": True, "recipe": self.recipe, "paths": dict(zip(keys, paths))})


class ClipEncoder:
    """Clips -> maps (C, T, H, W) with one recipe's backbone, on ``device``.

    Args:
        recipe: the recipe to run (a cache's recipe is checked against the built backbone).
        device: where the backbone runs.
        workers: decode processes (0: decode in this process, without a timeout).
        batch_size: frames per forward pass (None: 256 on CUDA, 32 on CPU, as extract).
        timeout: seconds one clip may take to decode (per decoder) with workers.
        features: the clip feature store folder, or None.
    """

    def __init__(self, recipe: Recipe, device: torch.device, *, workers: int = 0,
                 batch_size: int | None = None, timeout: float = 60.0,
                 features: str | os.PathLike | None = None):
        self.config, self.backbone = prepare_backbone(recipe.config, device)
        self.recipe = built_recipe(self.config, self.backbone)
        if recipe.expected is not None:
            problems = recipe_problems(recipe.expected, self.recipe)
            if problems:
                raise UserError(f"the backbone rebuilt from {recipe.source} does not make its "
                                f"features ({problems[0]}): the weights changed since "
                                "extraction?")
        self.source = recipe.source
        self.workers, self.timeout = workers, timeout
        self.batch_size = batch_size or (256 if torch.device(device).type == "cuda" else 32)
        self.store = ClipStore(features, self.recipe) if features else None
        self.computed = 0  # clips decoded (and run through the backbone) by this encoder
        self.reused = 0  # clips whose maps (or decoding failure) came from the store

    @property
    def shape(self) -> tuple[int, int, int, int]:
        c, h, w = self.backbone.shape
        return c, self.config.frames, h, w

    def encode(self, clips: dict[str, Clip], progress: bool = True
               ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """({key: maps (C, T, H, W)}, {key: why it failed}) of ``clips`` ({content key: clip}),
        maps from the store where it has them, the rest decoded and run once."""
        found, known = self.store.lookup(list(clips)) if self.store else ({}, {})
        self.reused += len(found) + len(known)
        todo = [k for k in clips if k not in found and k not in known]
        if not todo:
            return found, known
        part = self.store.part(todo, [clips[k].path for k in todo], self.shape,
                               self.config.dtype) if self.store else None
        try:
            maps, failed = self._run([clips[k] for k in todo], todo, part, progress)
            if part is not None and failed:
                part.update_attrs(failed=failed)
        finally:
            if part is not None:
                part.close()
        self.computed += len(maps) + len(failed)
        return {**found, **maps}, {**known, **failed}

    def _run(self, clips: list[Clip], keys: list[str], part: FeatureCache | None,
             progress: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        cfg = self.config
        interpolation = self.backbone.preprocessing.interpolation
        tasks = [DecodeTask(row=i, video_id=key, path=clip.path, kind=clip.kind,
                            frames=cfg.frames, resize=cfg.resize, image_size=cfg.image_size,
                            interpolation=interpolation)
                 for i, (key, clip) in enumerate(zip(keys, clips))]
        maps: dict[str, np.ndarray] = {}
        failed: dict[str, str] = {}
        batcher = Batcher(self.batch_size)
        row_of = {key: i for i, key in enumerate(keys)}

        def forward() -> None:
            crops, owners = batcher.take()
            out = self.backbone.extractor(crops)  # (B, C, h, w)
            for item in batcher.give(out, owners):
                features, _ = video_maps(item, cfg.frames)  # (C, T, h, w)
                key = item.video.video_id
                maps[key] = features
                if part is not None:
                    part.write_row(row_of[key], features)

        pool = DecodePool(workers=self.workers, timeout=self.timeout)
        with tqdm(total=len(tasks), desc="clips", unit="clip", disable=not progress,
                  leave=False) as bar:
            for result in pool.imap(tasks):
                bar.update(1)
                if isinstance(result, DecodeFailure):
                    failed[result.video_id] = result.reason
                    continue
                batcher.add(result)
                while batcher.waiting >= self.batch_size:
                    forward()
            while batcher.waiting:
                forward()
        return maps, failed

