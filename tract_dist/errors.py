"""The project's two error bases, so the command line maps bases, not a list of classes.

- :class:`TractError`: the input or the usage is wrong (config, data, scale, asset, a stale or locked folder, a
  refused submission or plan). ``tract_dist.cli`` prints ``tract-dist: error: <message>`` and exits 2, no
  traceback: the message says what to change.
- :class:`RunFailure`: the run itself failed (a non-finite loss, a checkpoint that cannot be written or read, a
  worker that died), with its own explanation: the message, exit 1.

Every user-facing error class of the library derives from one of them (with the builtin it also is, e.g.
``ValueError``, so existing ``except`` clauses keep working). Kept apart from ``cli`` so that a library module
never imports the command line, and so that ``python -m tract_dist.cli`` (which loads cli.py a second time, as
``__main__``) still catches the one class.
"""

from __future__ import annotations


class TractError(Exception):
    """Base of the errors a command reports as a message and exit 2."""


class UsageError(TractError, ValueError):
    """A command was given arguments it cannot act on; the message says what to change."""


class RunFailure(Exception):
    """Base of the failures of a run (not of its input) that a command reports as a message and exit 1."""
