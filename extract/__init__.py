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
    pipeline.py         parallel decode -> batched forward -> cache rows; resume; rank sharding
    adapt.py            adapt-backbone: train the backbone on the train split's classes, once,
                        first; its per-dataset recipes (an unknown dataset is an error)
    frames.py           the one public frame reader phase two's figures use
    toydata.py          the generated toy video dataset of ``make demo``

``cli.py extract`` calls ``pipeline.run_extract``; ``cli.py adapt-backbone`` calls
``adapt.run_adapt``; ``pipeline.read_errors(cache)`` returns a
cache's merged error report (missing videos, videos that failed to decode).
"""

from extract.pipeline import ExtractConfig, ExtractSummary, read_errors, run_extract

__all__ = ["ExtractConfig", "ExtractSummary", "read_errors", "run_extract"]
