"""Fault-injection (and observing) hooks for the training tests, installed through the recipe's hook points.

Each fault fires once per run folder (a marker file there survives the worker's restart), so a resumed or
restarted worker runs clean. ``install(monkeypatch, name, **options)`` installs one for the runs this process
starts (undone with the test's monkeypatch); ``cli_with_hook(name, **options)`` is the command that runs the CLI
in a subprocess with it installed (``run_cli_with_hooks.py``: production reads no hook from the environment).
The hooks are named by this file's path: Ray's workers and torchrun's ranks do not share pytest's sys.path.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import sys

import tract_dist.train.hooks as hooks_module
from tract_dist.train.hooks import CHECKPOINT_WRITTEN, MICRO_BATCH, STEP_BEGIN, HookContext, HookSpec


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


def spec(name: str, **options: Any) -> HookSpec:
    return HookSpec(f"{Path(__file__).resolve()}:{name}", options)


def install(monkeypatch: Any, name: str, **options: Any) -> None:
    monkeypatch.setattr(hooks_module, "_INSTALLED", [spec(name, **options)])


def uninstall(monkeypatch: Any) -> None:
    monkeypatch.setattr(hooks_module, "_INSTALLED", [])


def cli_with_hook(name: str, **options: Any) -> list[str]:
    """``[python, run_cli_with_hooks.py, SPECS]``: append the CLI's arguments."""
    s = spec(name, **options)
    return [sys.executable, str(Path(__file__).with_name("run_cli_with_hooks.py")),
            json.dumps([{"target": s.target, "options": s.options}])]
