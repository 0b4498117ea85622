"""Phase two: episodes, alignment heads, training, evaluation and analysis on cached maps.

Nothing is re-exported here; import from the submodules, for example
``from align.heads import build_head, load_head`` (the TA2N parts live in ``align.ttm``,
``align.acm``, ``align.prototypes`` and ``align.otam``).
"""
