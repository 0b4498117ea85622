"""Phase two: episodes, alignment heads, training, evaluation and analysis on cached maps.

Nothing is re-exported here; import from the subpackages, for example
``from align.models import build_head`` and ``from align.checkpoints import load_head``.
"""
