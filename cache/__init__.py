"""The feature cache: the contract between phase one (extract) and phase two (align).

Users open caches from their own code with ``FeatureCache.open(path)``; see docs/cache.md.
"""

from cache.errors import UserError
from cache.store import SCHEMA_VERSION, SPLITS, FeatureCache, format_info

__all__ = ["SCHEMA_VERSION", "SPLITS", "FeatureCache", "UserError", "format_info"]
