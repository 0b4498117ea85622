"""Command line: click wiring only; each command parses options, calls one function, prints.

    python cli.py extract --dataset ucf101        # phase one, once per dataset
    python cli.py train-heads --shots 5           # phase two, minutes per experiment
    python cli.py evaluate --episodes 5000
"""

from __future__ import annotations

import click
import torch

from cache import FeatureCache, UserError, format_info

DEVICE_CHOICES = click.Choice(["auto", "cpu", "cuda"])


def pick_device(name: str) -> torch.device:
    """The one place a device is chosen; everything below receives it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """TA2N few-shot action recognition on cached backbone features."""


# ------------------------------------------------------------------------------------ info
@cli.command()
@click.argument("cache_path", metavar="CACHE")
def info(cache_path):
    """Summarise a feature cache: rows per split, classes, done / not done, size on disk."""
    with FeatureCache.open(cache_path) as cache:
        click.echo(format_info(cache.info()))


# ------------------------------------------------------------------------------------ extract
@cli.command(context_settings={"ignore_unknown_options": True})
def extract():
    """Phase one: decode videos, sample T frames, run the frozen backbone, write the cache."""
    raise UserError("extract is not built yet")


# ------------------------------------------------------------------------------------ train-heads
@cli.command("train-heads")
def train_heads():
    """Phase two: train the alignment heads episodically from a cache."""
    raise UserError("train-heads is not built yet")


# ------------------------------------------------------------------------------------ evaluate
@cli.command()
def evaluate():
    """Evaluate a head on test episodes: accuracy with its 95% confidence interval."""
    raise UserError("evaluate is not built yet")


if __name__ == "__main__":
    cli()
