"""The one error type for problems a user can fix (bad path, wrong schema, impossible request).

It is a ``click.ClickException``: the CLI prints its one-line message without a traceback and
exits with status 1. Bugs raise ordinary exceptions. Two subclasses let callers choose their
advice: a cache another process holds (waiting helps, ``--overwrite`` does not) and a path that
holds something other than a cache (it is never replaced).
"""

import click


class UserError(click.ClickException):
    """A problem the user can fix; the message says what it is and, where possible, what to do."""


class CacheInUse(UserError):
    """Another process holds the cache (an HDF5 writer, or a running extract)."""


class NotACache(UserError):
    """The path holds something that is not a feature cache of this tool; it is never replaced."""


class DamagedChunk(Exception):
    """Internal: a stored chunk failed its checksum or could not be decoded. ``FeatureCache``
    turns it into a one-line ``UserError`` naming the row."""
