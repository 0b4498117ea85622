"""Phase one: videos -> TSN-sampled frames -> frozen backbone maps -> one cache row per video.

    datasets.py         split lists (vendored in splits/) -> video records; missing videos
    sampling.py         TSN frame indices; seeded crop / flip / frame choice of augmented views
    decode.py           decord (PyAV fallback, frame folders) in killable worker processes -> crops
    backbones.py        the backbone registry: BackboneFamily, register, parse_backbone (the
                        one name check), the one --weights none / pretrained / file logic
    backbone.py         what every family shares: weights records and provenance,
                        preprocessing, the runner that turns uint8 crops into maps
    resnet_backbone.py  family: torchvision ResNets (``resnet18`` ... ``resnet152``)
    timm_backbone.py    family: timm models (``timm:<name>[.<tag>]``)
    clip_backbone.py    family: open_clip image towers (``clip:<arch>/<tag>``)
    producer.py         what extract and adapt-backbone share: the decode Producer thread,
                        the Batcher of forward batches, the Writers threads, default_workers
    plan.py             ExtractConfig (extract's options), Shard (this process's rows),
                        RunPlan (batch / decode / write settings), ExtractSummary
    output.py           the cache extract writes: attributes and fingerprint, create / resume /
                        wait for it across ranks, error reports (read_errors)
    pipeline.py         the run: parallel decode -> batched forward -> cache rows; resume of
                        done rows; rank sharding
    adapt.py            adapt-backbone (train the backbone on the train split's classes, once,
                        first): AdaptConfig and its per-dataset recipes (an unknown dataset is
                        an error)
    adapt_data.py       its videos: the train split, the held-out slice, the training views
    adapt_model.py      its TSN classifier, BatchNorm merging, optimizer, learning-rate schedule
    adapt_train.py      one adaptation run: prepare, resume, the epochs (DDP), checkpoints
    adapt_export.py     the adapted weights file and its provenance sidecar
    frames.py           the one public frame reader phase two's figures use
    toydata.py          the generated toy video dataset of ``make demo``

``cli.py extract`` calls ``pipeline.run_extract``; ``cli.py adapt-backbone`` calls
``adapt_train.run_adapt``; ``output.read_errors(cache)`` returns a
cache's merged error report (missing videos, videos that failed to decode).
"""

from extract.output import read_errors
from extract.pipeline import run_extract
from extract.plan import ExtractConfig, ExtractSummary

__all__ = ["ExtractConfig", "ExtractSummary", "read_errors", "run_extract"]
