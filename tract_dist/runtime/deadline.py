"""When inference work for one request must stop before it ends: its deadline passed or it was cancelled.

A judge server answers 504 at its request deadline and Serve cancels a request whose client went away; neither
stops a generation already running in a replica's worker thread. A :class:`StopSignal` travels with each input
into the batch instead: the HF engine checks it once per decode step (a transformers ``StoppingCriteria`` that
ends only that row), the vLLM engine aborts the request between scheduler steps, and the judge skips the
read-out of an input whose signal fired. So a timed-out or abandoned request costs at most one more decode
step, and its batch slot goes to the next request.

Thread-safe: the replica's event loop cancels a signal while the worker thread reads it.
"""

from __future__ import annotations

import threading
import time


class StopSignal:
    """A deadline on ``time.monotonic()`` (None: none) and a cancellation flag; :meth:`reason` says which fired."""

    __slots__ = ("deadline", "_cancelled")

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline
        self._cancelled = threading.Event()

    @classmethod
    def until_unix(cls, deadline_unix: float | None) -> "StopSignal":
        """A signal for a deadline given as Unix time (what crosses processes and machines; monotonic clocks
        are per machine): converted once, here, to this process's monotonic clock."""
        if deadline_unix is None:
            return cls(None)
        return cls(time.monotonic() + (float(deadline_unix) - time.time()))

    def cancel(self) -> None:
        self._cancelled.set()

    def reason(self, now: float | None = None) -> str | None:
        """``"cancelled"``, ``"deadline"`` (past it) or None (keep going)."""
        if self._cancelled.is_set():
            return "cancelled"
        if self.deadline is not None and (time.monotonic() if now is None else now) >= self.deadline:
            return "deadline"
        return None


def fired(stops: list[StopSignal | None] | None, i: int, now: float | None = None) -> str | None:
    """The reason row ``i`` must stop (None when it has no signal or its signal has not fired)."""
    s = stops[i] if stops else None
    return s.reason(now) if s is not None else None
