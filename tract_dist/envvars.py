"""Environment variables set for a block and restored after it: the one helper (a quiet run's library settings,
the variables a spawned engine process inherits)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping


@contextlib.contextmanager
def temporary_env(values: Mapping[str, str]) -> Iterator[dict[str, str | None]]:
    """Set ``values`` in ``os.environ`` for the block; on exit every variable gets its previous value back (unset
    if it was unset). Yields the saved previous values: a variable the block sets later and wants restored too is
    added to it (``saved[name] = os.environ.get(name)``)."""
    saved: dict[str, str | None] = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield saved
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
