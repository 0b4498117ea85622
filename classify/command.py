"""`python cli.py classify`: the command around ``FewShotClassifier`` - outputs checked before
any work, the classifier built and fitted, the queries predicted, the files written, the
summary printed."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cache import UserError
from cache.atomic import write_json
from cache.paths import check_writable
from classify.api import FewShotClassifier
from classify.config import ClassifyConfig
from classify.report import (
    accuracy,
    draw_figures,
    format_accuracy,
    format_table,
    summary_lines,
    write_csv,
)


def _check_file(path: str | None, option: str, overwrite: bool) -> None:
    if path is None:
        return
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{option} {path} exists; pass --overwrite to replace it, or choose "
                        "another path")
    check_writable(path, "file", option)


def _check_figures(path: str | None) -> None:
    """A figure folder is new, empty, or one classify wrote (it holds our index.json)."""
    if path is None:
        return
    folder = Path(path)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir())
                                                    and not (folder / "index.json").is_file())):
        raise UserError(f"--figures {path} exists and is not a figure folder of classify; "
                        "choose another")
    check_writable(path, "folder", "--figures")


def build_classifier(cfg: ClassifyConfig, device: torch.device, log=print) -> FewShotClassifier:
    if cfg.checkpoint and cfg.head:
        raise UserError("give --checkpoint or --head, not both")
    if cfg.head:
        return FewShotClassifier.training_free(
            cfg.head, cache=cfg.cache, backbone=cfg.backbone, weights=cfg.weights,
            frames=cfg.frames, image_size=cfg.image_size, features=cfg.features, device=device,
            workers=cfg.workers, log=log)
    if cfg.backbone:
        raise UserError("--backbone goes with a training-free --head; a checkpoint uses the "
                        "backbone of the cache it was trained on")
    return FewShotClassifier.from_checkpoint(cfg.checkpoint, cache=cfg.cache,
                                             features=cfg.features, device=device,
                                             workers=cfg.workers, log=log)


def classify_command(cfg: ClassifyConfig, *, device: torch.device, log=print,
                     progress: bool = True) -> dict:
    """Run ``cfg``: write the CSV (and JSON, figures), print the table and summary; return
    {"predictions", "classes", "accuracy" (or None), "out", "figures"}."""
    _check_file(cfg.out, "--out", cfg.overwrite)
    _check_file(cfg.json, "--json", cfg.overwrite)
    _check_figures(cfg.figures)
    clf = build_classifier(cfg, device, log)
    log(f"backbone   {clf.encoder.source}: {clf.encoder.recipe['backbone']}, "
        f"T={clf.encoder.config.frames}, {clf.encoder.config.image_size} px")
    clf.fit(cfg.support, progress=progress)
    predictions = clf.predict(list(cfg.query), progress=progress)
    write_csv(cfg.out, predictions, clf.classes)
    scores = accuracy(predictions, clf.classes)
    figures = draw_figures(clf, predictions, cfg.figures, progress,
                                 cfg.max_figures) if cfg.figures else []
    result = {"predictions": [p.to_dict() for p in predictions], "classes": clf.classes,
              "support": clf.support_paths, "head": clf.head.kind,
              "shot_rule": clf.head.shot_rule, "accuracy": scores, "out": cfg.out,
              "figures": figures, "computed": clf.encoder.computed,
              "reused": clf.encoder.reused}
    if cfg.json:
        write_json(cfg.json, result)
    log(format_table(predictions, cfg.show))
    for line in summary_lines(predictions, clf):
        log(line)
    if scores is not None:
        log(format_accuracy(scores))
    log(f"csv        {cfg.out}" + (f"\njson       {cfg.json}" if cfg.json else "")
        + (f"\nfigures    {len(figures)} in {cfg.figures}" if cfg.figures else ""))
    return result
