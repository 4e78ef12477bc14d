"""The entry point of a training worker process: one function of one plan, for every launcher.

Ray Train calls ``train_worker(config_dict)`` (``TorchTrainer(train_loop_per_worker=train_worker)``), torchrun's
ranks call it with the plan read from ``loop.json`` (``python -m tract_dist.train.torchrun_main``) and the
inline launcher with the :class:`~tract_dist.train.plan.WorkerPlan` itself. What a worker does is the recipe
(:mod:`tract_dist.train.recipe`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from tract_dist.train.guards import NONFINITE, NonFiniteLossError
from tract_dist.train.plan import WorkerPlan

__all__ = ["NONFINITE", "NonFiniteLossError", "WorkerPlan", "train_worker"]


def train_worker(plan: WorkerPlan | Mapping[str, Any]) -> None:
    """Train one stage: setup -> resume -> steps (checkpoints) -> export. ``plan``: a WorkerPlan, or its
    ``to_dict()`` (what Ray Train and torchrun deliver).

    A worker process (Ray, torchrun) writes its output (DeepSpeed, gloo, transformers, warnings) to
    ``RUN_DIR/logs/train-rank<R>.log`` unless ``--verbose``; the recipe's console lines still reach the terminal,
    and so does an error, with the log's path. The inline launcher runs in the driver, whose output stays put."""
    from tract_dist import console
    from tract_dist.train.recipe import run_recipe

    console.attach()  # a worker process's entry point: the project's console lines (e.g. tracking warnings)
    plan = WorkerPlan.coerce(plan)
    if plan.launcher == "inline":
        run_recipe(plan)
        return
    rank = os.environ.get("RANK") or f"pid{os.getpid()}"  # torchrun and Ray Train set RANK
    log = Path(plan.run_dir) / "logs" / f"train-rank{rank}.log"
    with console.output_to(log):
        try:
            run_recipe(plan)
        except BaseException as e:
            if console.log_path() is not None:
                console.error(f"[train] rank {rank} failed: {type(e).__name__}: {str(e)[:500]} (full log: {log})")
            raise
