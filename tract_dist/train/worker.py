"""The entry point of a training worker process: one function of one plan, for every launcher.

Ray Train calls ``train_worker(config_dict)`` (``TorchTrainer(train_loop_per_worker=train_worker)``), torchrun's
ranks call it with the plan read from ``loop.json`` (``python -m tract_dist.train.torchrun_main``) and the
inline launcher with the :class:`~tract_dist.train.plan.WorkerPlan` itself. What a worker does is the recipe
(:mod:`tract_dist.train.recipe`).
"""

from __future__ import annotations

from typing import Any, Mapping

from tract_dist.train.guards import NONFINITE, NonFiniteLossError
from tract_dist.train.plan import WorkerPlan

__all__ = ["NONFINITE", "NonFiniteLossError", "WorkerPlan", "train_worker"]


def train_worker(plan: WorkerPlan | Mapping[str, Any]) -> None:
    """Train one stage: setup -> resume -> steps (checkpoints) -> export. ``plan``: a WorkerPlan, or its
    ``to_dict()`` (what Ray Train and torchrun deliver)."""
    from tract_dist.train.recipe import run_recipe

    run_recipe(WorkerPlan.coerce(plan))
