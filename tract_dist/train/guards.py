"""The non-finite stop: a NaN or infinite step ends the run before any save, naming what to look at.

Every rank holds the same all-reduced step statistics and global gradient norm, so every rank reaches the
same decision at the same step without communicating. Rank 0 writes ``RUN_DIR/nonfinite.json``; the driver
(trainer), and a worker Ray Train restarts, read it back through :func:`read_nonfinite`, the one reader, to raise
one clear error whatever the launcher wrapped it in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tract_dist.errors import RunFailure

if TYPE_CHECKING:
    from tract_dist.train.session import TrainingSession

NONFINITE = "nonfinite.json"


class NonFiniteLossError(RunFailure, RuntimeError):
    """The all-reduced loss or the gradient norm of a step is NaN or infinite; training stopped before saving."""


def nonfinite_values(checked: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in checked.items() if not math.isfinite(v)}


def stop_nonfinite(step: int, bad: dict[str, float], ids: list[str], session: TrainingSession, run_dir: Path, rank: int,
                   invocation: str | None) -> None:
    """Stop the run at a non-finite step: no checkpoint of it (or later) is written; the last good checkpoint
    is pinned so that no later save prunes it; rank 0 records what happened in ``RUN_DIR/nonfinite.json``."""
    last = session.last_good
    values = ", ".join(f"{k}={v}" for k, v in bad.items())
    shown = ", ".join(ids[:32]) + (f", ... ({len(ids)} records)" if len(ids) > 32 else "")
    pinned = ("pinned: later saves will not prune it" if session.launcher == "local"
              else "the driver pins a hard-linked copy when Ray's storage is local")
    where = (f"the last good checkpoint is {last} ({pinned})" if last
             else "no checkpoint was written before it (the run must start from the seed model)")
    msg = (f"non-finite training values at step {step}: {values}; batch record ids: {shown}. Training stopped "
           f"before writing any checkpoint of this step; {where}. Lower training.learning_rate (or raise "
           f"warm-up, check those records) and rerun")
    if last:
        session.pin(last, msg)
    if rank == 0:
        from tract_dist.fsutil import atomic_write_json

        atomic_write_json(run_dir / NONFINITE, {"step": step, "values": {k: str(v) for k, v in bad.items()},
                                                "record_ids": ids, "last_good_checkpoint": last,
                                                "launcher": session.launcher, "invocation": invocation,
                                                "message": msg})
    raise NonFiniteLossError(msg)


def read_nonfinite(run_dir: Path, invocation: str | None) -> dict[str, Any] | None:
    """The non-finite stop recorded in ``RUN_DIR/nonfinite.json`` by this invocation, or None (no record, an
    unreadable one, or another invocation's: a rerun after lowering the learning rate must not fail on it)."""
    path = Path(run_dir) / NONFINITE
    if invocation is None or not path.exists():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("invocation") != invocation:
        return None
    return info


def refuse_known_nonfinite(run_dir: Path, invocation: str | None) -> None:
    """A worker restarted by Ray Train within the same invocation after a non-finite stop would only meet the
    same NaN again (the data and weights are deterministic): fail at once instead of burning the retries."""
    info = read_nonfinite(run_dir, invocation)
    if info is not None:
        raise NonFiniteLossError(info.get("message", "non-finite training values (see nonfinite.json)"))
