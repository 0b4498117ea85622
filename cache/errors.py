"""The one error type for problems a user can fix (bad path, wrong schema, impossible request).

It is a ``click.ClickException``: the CLI prints its one-line message without a traceback and
exits with status 1. Bugs raise ordinary exceptions.
"""

import click


class UserError(click.ClickException):
    """A problem the user can fix; the message says what it is and, where possible, what to do."""
