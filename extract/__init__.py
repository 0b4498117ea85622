"""Phase one: videos -> TSN-sampled frames -> frozen ResNet maps -> one cache row per video.

    datasets.py   split lists (vendored in splits/) -> video records; missing videos
    sampling.py   TSN frame indices; seeded crop / flip / frame choice of augmented views
    decode.py     decord (PyAV fallback, frame folders) in killable worker processes -> crops
    backbone.py   ResNet trunk, weights (imagenet | file | none), normalisation, forward
    pipeline.py   parallel decode -> batched forward -> cache rows; resume; rank sharding
    adapt.py      adapt-backbone: train the backbone on the train split's classes, once, first

``cli.py extract`` calls ``pipeline.run_extract``; ``cli.py adapt-backbone`` calls
``adapt.run_adapt``; ``pipeline.read_errors(cache)`` returns a
cache's merged error report (missing videos, videos that failed to decode).
"""

from extract.pipeline import ExtractConfig, ExtractSummary, read_errors, run_extract

__all__ = ["ExtractConfig", "ExtractSummary", "read_errors", "run_extract"]
