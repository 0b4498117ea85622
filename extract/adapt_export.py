"""What adaptation leaves behind: ``<out>``, the backbone's plain state dict in its library's
own key names (what ``extract --weights`` loads, checked by loading it back), and
``<out>.json``, its provenance sidecar (base classes, videos, recipe, hashes).
"""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import torch

from cache.atomic import atomic_path, write_json
from extract.adapt import RESULT_FIELDS
from extract.backbone import ADAPT_FORMAT, file_sha256, sidecar_path, state_sha256
from extract.output import code_version

if TYPE_CHECKING:  # the prepared run; adapt_train imports this module
    from extract.adapt_train import Job


def exported_state(job: Job) -> dict[str, torch.Tensor]:
    """The backbone's state dict in its library's own key names (what extract --weights
    loads); for torchvision ResNets with the base-class classifier as ``fc`` (a complete
    torchvision model with K classes, whose fc extract ignores)."""
    state = job.spec.family.exported_state(job.model.trunk, job.model.fc)
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def export(job: Job, failed: list[dict]) -> tuple[str, str]:
    """Write the weights file and its sidecar; check that the registry loads the file into
    exactly the trained backbone. Returns (file sha256, state sha256)."""
    config = job.config
    buffer = io.BytesIO()  # saved under a fixed archive name: same weights, same bytes, same hash
    torch.save(exported_state(job), buffer)
    with atomic_path(config.out) as tmp:
        tmp.write_bytes(buffer.getvalue())
    sha = file_sha256(config.out)
    trunk_sha = state_sha256(job.model.trunk)
    _, loaded = job.spec.load(config.out, config.seed, config.image_size)
    if loaded.state_sha256 != trunk_sha:
        raise RuntimeError(f"{config.out} does not load back into the trained {config.backbone}")
    last = job.history[-1] if job.history else None
    write_json(sidecar_path(config.out), {
        "format": ADAPT_FORMAT, "version": 1, "weights_sha256": sha, "state_sha256": trunk_sha,
        "dataset": config.dataset, "root": config.root, "split_dir": config.split_dir,
        "backbone": job.spec.to_attrs(), "init_weights": job.init.to_attrs(),
        "base_classes": job.data.classes, "epochs": config.epochs,
        "recipe": {k: getattr(config, k) for k in RESULT_FIELDS[5:]},
        "world_size": job.shard.world_size,
        "held_out_accuracy": last.held_out_accuracy if last else None,
        "train_accuracy": round(last.train_accuracy, 2) if last else None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version(), "failed": failed,
        "videos": [r.video_id for r in job.data.train],
        "held_out_videos": [r.video_id for r in job.data.held_out]})
    return sha, trunk_sha
