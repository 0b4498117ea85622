"""What adaptation trains: the backbone as a TSN classifier, its BatchNorm statistics merged
across ranks, the optimizer and the learning-rate schedule, and the input normaliser.

BatchNorm runs on batch statistics in training; its running statistics are the plain average
over the epoch's micro-batches (momentum None, reset every epoch), merged across ranks at the
epoch's end. That makes the exported statistics, like the weights, independent of how many
processes shared the work: W processes with micro-batch m give the one-process run with
micro-batch m (gradient accumulation) up to float rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from extract.adapt import AdaptConfig
from extract.decode import DecodedVideo


class TSNClassifier(nn.Module):
    """A backbone as a TSN classifier: maps -> spatial mean -> linear -> per-frame logits,
    averaged over the T frames (TSN's consensus).

    Args:
        trunk: normalised (N, 3, S, S) -> (N, C, h, w), trainable.
        channels: C.
        classes: number of base classes.
        generator: draws the linear layer's init (normal, std 0.01, as TSN's new layers).
    """

    def __init__(self, trunk: nn.Module, channels: int, classes: int,
                 generator: torch.Generator):
        super().__init__()
        self.trunk = trunk
        self.fc = nn.Linear(channels, classes)
        with torch.no_grad():
            self.fc.weight.normal_(0, 0.01, generator=generator)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        maps = self.trunk(x.flatten(0, 1))  # (B*T, C, h, w)
        logits = self.fc(maps.float().mean((-2, -1)))  # (B*T, K)
        return logits.view(b, t, -1).mean(1)  # (B, K)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def merge_batchnorm(model: nn.Module, world: int) -> None:
    """Running statistics of all ranks -> their average (each rank saw as many micro-batches);
    batch counts summed: the statistics one process would have gathered over all of them."""
    if world == 1:
        return
    for bn in batchnorms(model):
        if bn.running_mean is None:
            continue
        for buffer in (bn.running_mean, bn.running_var):
            dist.all_reduce(buffer)
            buffer /= world
        dist.all_reduce(bn.num_batches_tracked)


def build_optimizer(model: nn.Module, config: AdaptConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; no weight decay on biases and norm weights (the grouping of
    timm.optim.param_groups_weight_decay, written out: importing timm costs seconds of CPU)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
              {"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


class Normalizer:
    """uint8 crops (B, T, 3, S, S) -> the backbone's normalised float input on the device."""

    def __init__(self, mean, std, device: torch.device):
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 1, 3, 1, 1) * 255

    def __call__(self, videos: list[DecodedVideo]) -> torch.Tensor:
        crops = torch.from_numpy(np.stack([v.views[0] for v in videos]))  # (B, T, 3, S, S)
        crops = crops.to(self.device, non_blocking=True)
        return (crops.float() - self.mean) / self.std  # (B, T, 3, S, S)
