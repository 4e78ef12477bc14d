"""Named points in the training recipe where an installed hook is called (tests inject faults here).

The recipe calls :meth:`Hooks.call` at a few named points and knows nothing of what a hook does; with no
hook installed (production) a call is a no-op. A hook is named, not passed as an object, because it must
reach every worker process: Ray Train ships the plan as a dict and torchrun ranks read it from a JSON file.
So a :class:`HookSpec` names an importable ``module:callable`` (or ``/path/to/file.py:callable``: test files
are not an installed package, and neither Ray's workers nor torchrun's ranks share pytest's ``sys.path``)
plus JSON keyword options, and each worker imports it at set-up.

Hooks are installed in the driver's process only, by a call (:func:`install_hooks`): the test suite makes it
(in-process, or through its own launcher script around the CLI); nothing in the environment, a config or a file
that production reads can name code to import. The driver puts :func:`installed_hooks` into the workers' plan.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tract_dist.errors import TractError

STEP_BEGIN = "step_begin"
"""Before the first forward of step ``ctx.step`` (1-based, as in metrics.jsonl and checkpoint names)."""
CHECKPOINT_WRITTEN = "checkpoint_written"
"""This rank has written its files of checkpoint ``ctx.step`` into ``ctx.checkpoint``; the ranks have not yet
agreed that the save succeeded, so nothing is published."""
MICRO_BATCH = "micro_batch"
"""Before the forward of one micro-batch of step ``ctx.step`` on this rank; ``ctx.ids`` are its record ids (a
filler, which a rank runs with weight 0 when it has no sample of its own, is not reported)."""
POINTS = (STEP_BEGIN, CHECKPOINT_WRITTEN, MICRO_BATCH)


@dataclass(frozen=True)
class HookSpec:
    """One hook: ``target`` is ``"package.module:callable"`` or ``"/path/file.py:callable"``; the callable is
    called as ``fn(point, ctx, **options)`` at every point (it picks the ones it cares about)."""

    target: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HookSpec:
        return cls(target=str(d["target"]), options=dict(d.get("options") or {}))


@dataclass(frozen=True)
class HookContext:
    """Where the recipe is when a hook is called."""

    step: int
    rank: int
    world_size: int
    run_dir: Path
    checkpoint: str | None = None  # the folder being written (CHECKPOINT_WRITTEN)
    ids: tuple[str, ...] = ()  # the record ids of the micro-batch (MICRO_BATCH)


class HookError(TractError, ValueError):
    """A hook named in the plan cannot be imported."""


def _resolve(target: str) -> Callable[..., Any]:
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise HookError(f"training hook {target!r}: expected 'module:callable' or '/path/file.py:callable'")
    try:
        if where.endswith(".py"):
            spec = importlib.util.spec_from_file_location(f"tract_dist_hook_{Path(where).stem}", where)
            if spec is None or spec.loader is None:
                raise ImportError(f"no such file {where}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        fn = getattr(module, name)
    except (ImportError, AttributeError, OSError) as e:
        raise HookError(f"training hook {target!r} cannot be loaded ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise HookError(f"training hook {target!r} is not callable")
    return fn


class Hooks:
    """The hooks of one worker, imported once; ``call`` runs each in order."""

    def __init__(self, specs: tuple[HookSpec, ...] = ()) -> None:
        self._hooks = [(_resolve(s.target), dict(s.options)) for s in specs]

    def call(self, point: str, ctx: HookContext) -> None:
        assert point in POINTS, point
        for fn, options in self._hooks:
            fn(point, ctx, **options)


_INSTALLED: list[HookSpec] = []
"""The driver process's hooks (none in production)."""


def install_hooks(*specs: HookSpec) -> None:
    """Install ``specs`` for the runs this process starts from now on (tests)."""
    _INSTALLED.extend(specs)


def uninstall_hooks() -> None:
    _INSTALLED.clear()


def installed_hooks() -> tuple[HookSpec, ...]:
    """The hooks the next run's workers import (none unless this process called :func:`install_hooks`)."""
    return tuple(_INSTALLED)
