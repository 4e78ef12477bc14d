"""Errors that library code raises for a caller to report, without importing the command line.

Library modules (``judge``, ``generate``, ...) raise these; ``tract_dist.cli`` catches :class:`TractError` and
turns it into ``tract-dist: error: <message>`` and exit 2 (bad input or usage: the message says what to change,
no traceback). Kept apart from ``cli`` so that a library module never imports the command line, and so that
``python -m tract_dist.cli`` (which loads cli.py a second time, as ``__main__``) still catches the one class.
"""

from __future__ import annotations


class TractError(Exception):
    """Base of the errors a command reports as a message and exit 2."""


class UsageError(TractError, ValueError):
    """A command was given arguments it cannot act on; the message says what to change."""
