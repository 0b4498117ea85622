"""Decoders that misbehave like decord does on bad files, for the DecodePool tests.

They live in an importable module (not in a test file) because worker processes import them.
"""

import os
import time

from extract.decode import decode_task


def hang_in_decord(task, method):
    """decord hangs forever (as on files that over-report their frame count); PyAV works."""
    if method == "decord":
        time.sleep(3600)
    return decode_task(task, method)


def crash_in_decord(task, method):
    """decord takes the whole worker process down; PyAV works."""
    if method == "decord":
        os._exit(3)
    return decode_task(task, method)
