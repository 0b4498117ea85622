"""Reports on trained heads and caches: pair figures (``pairs``, `visualize`), training curves
(``curves``), and the analyses of `analyze`: ``misalignment``, ``embedding``, ``compare``.
"""
