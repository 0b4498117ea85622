"""The options extract and adapt-backbone share, declared once (cache/options.py): each
function is one field declaration - flag, default, range, choices, check - that both configs
use; ``help`` is the command's own where the two commands describe the option differently."""

from __future__ import annotations

from dataclasses import MISSING

from cache.datasets import video_datasets
from cache.options import Range, option
from extract.backbones import adaptable_forms, parse_backbone, plain_names, prefixed_forms
from extract.gpu_decode import DECODERS

# --backbone's help, read from the backbone registry (its families registered at import)
BACKBONE_NAMES = plain_names()
BACKBONE_PREFIXES = prefixed_forms()
ADAPTABLE_BACKBONES = adaptable_forms()


def dataset_option(help: str):
    return option(MISSING, help=help, choices=video_datasets)


def root_option():
    return option(None, help="Dataset folder.  [default: data/<dataset>]", path="any")


def split_dir_option(help: str):
    return option(None, help=help, path="dir")


def limit_option(help: str):
    return option(None, help=help, range=Range(1), kind=int)


def backbone_option(help: str):
    """--backbone, checked by the registry's ``parse_backbone`` while parsing (one-line error)."""
    return option("resnet50", help=help, check=parse_backbone)


def weights_option(help: str):
    return option("pretrained", help=help)


def frames_option(help: str):
    return option(8, help=help, range=Range(1), aliases=("-T",))


def image_size_option(help: str):
    return option(None, help=help, range=Range(1), kind=int)


def resize_option(help: str):
    return option(None, help=help, range=Range(1), kind=int)


def seed_option(help: str | None = None):
    return option(0, help=help)


def workers_option(help: str):
    return option(None, help=help, range=Range(0), kind=int)


def timeout_option(help: str):
    return option(60.0, help=help, range=Range(0, low_open=True))


def decoder_option():
    """--decoder: which video decoder reads the files (extract.gpu_decode.choose_decoder)."""
    return option("cpu", choices=DECODERS, help=(
        "Video decoder: cpu (decord, then PyAV), gpu (NVIDIA's NVDEC through PyNvVideoCodec, "
        "pip install 'ta2n-cache[gpu]'; refused when unusable; untested on hardware) or auto "
        "(gpu when usable, else cpu; says which). A clip the GPU rejects is decoded on the "
        "CPU."))
