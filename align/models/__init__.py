"""Phase two's models: the head interface (``base``), the heads (one module each: ``ta2n``,
``protonet``, ``otam``, ``trx``, ``trn``, ``tarn``, ``cmn``, ``arn``), TA2N's parts (``ttm``,
``acm``, ``prototypes``, and ``factored``: its per-video / per-pair split), what the learned
Table 2 heads share (``learned``), shared layer helpers (``layers``), the reading of a head's
own options from text and JSON (``head_options``) and the registry that builds a head from its
name or config.

The public names are re-exported here: ``from align.models import build_head, HEADS, Head``.
"""

from align.models.base import Head, HeadConfig
from align.models.head_options import parse_head_options
from align.models.registry import (
    HEADS,
    build_head,
    build_head_from_config,
    check_head_options,
    describe_heads,
    head_class,
    head_names,
)

__all__ = ["HEADS", "Head", "HeadConfig", "build_head", "build_head_from_config",
           "check_head_options", "describe_heads", "head_class", "head_names",
           "parse_head_options"]
