"""Fault-injection (and observing) hooks for the training tests, installed through the recipe's hook points.

Each fault fires once per run folder (a marker file there survives the worker's restart), so a resumed or
restarted worker runs clean. ``install(monkeypatch, name, **options)`` sets ``TRACT_DIST_TRAIN_HOOKS`` for a
run started in this process; ``env_value(name, **options)`` is the same for a subprocess's environment.
The hooks are named by this file's path: Ray's workers and torchrun's ranks do not share pytest's sys.path.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from tract_dist.train.hooks import (CHECKPOINT_WRITTEN, HOOKS_ENV, MICRO_BATCH, STEP_BEGIN, HookContext, HookSpec,
                                   encode_hooks)


def _first_time(ctx: HookContext, marker: str) -> bool:
    path = ctx.run_dir / marker
    if path.exists():
        return False
    path.write_text("1")
    return True


def fail_once(point: str, ctx: HookContext, *, after_step: int, marker: str = ".injected_failure") -> None:
    """Rank 0 raises right after step ``after_step`` completed (before the next step's first forward); once
    per run folder and ``marker`` (a second fault in the same folder names another marker)."""
    if point == STEP_BEGIN and ctx.step == after_step + 1 and ctx.rank == 0 and _first_time(ctx, marker):
        raise RuntimeError(f"injected failure after step {after_step} (fault-tolerance test)")


def kill_in_save(point: str, ctx: HookContext, *, step: int) -> None:
    """The last rank SIGKILLs itself halfway through the save of ``step``: its shards are written, the
    checkpoint is not published."""
    if (point == CHECKPOINT_WRITTEN and ctx.step == step and ctx.rank == ctx.world_size - 1
            and _first_time(ctx, ".injected_kill")):
        os.kill(os.getpid(), signal.SIGKILL)


def record_ids(point: str, ctx: HookContext) -> None:
    """Every rank appends the record ids of each micro-batch it trains on (fillers are not reported) to
    ``RUN_DIR/seen-rank<R>.jsonl``, one ``{"step", "ids"}`` line per micro-batch; :func:`seen_ids` reads them."""
    if point == MICRO_BATCH:
        with open(ctx.run_dir / f"seen-rank{ctx.rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": ctx.step, "ids": list(ctx.ids)}) + "\n")


def seen_ids(run_dir: Path) -> dict[int, list[str]]:
    """Step -> the sorted record ids every rank trained on at that step (a multiset: repeats stay)."""
    out: dict[int, list[str]] = {}
    for f in sorted(Path(run_dir).glob("seen-rank*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            d = json.loads(line)
            out.setdefault(d["step"], []).extend(d["ids"])
    return {k: sorted(v) for k, v in sorted(out.items())}


def env_value(name: str, **options: Any) -> str:
    return encode_hooks(HookSpec(f"{Path(__file__).resolve()}:{name}", options))


def install(monkeypatch: Any, name: str, **options: Any) -> None:
    monkeypatch.setenv(HOOKS_ENV, env_value(name, **options))


def uninstall(monkeypatch: Any) -> None:
    monkeypatch.delenv(HOOKS_ENV)
