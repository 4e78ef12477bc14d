"""What the driver hands every training worker: one typed, picklable, JSON-able plan.

Ray Train passes it as ``train_loop_config`` (a dict: Ray validates that config as one, see
:meth:`WorkerPlan.to_dict`); torchrun's ranks read it from ``RUN_DIR/loop.json``; the inline launcher passes
the object itself. Light on purpose (no torch, no DeepSpeed): the driver imports it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from tract_dist.train.hooks import HookSpec


@dataclass(frozen=True)
class WorkerPlan:
    """One training stage as a worker runs it."""

    config: dict[str, Any]
    """``Config.model_dump()`` of the stage (validated again in the worker)."""
    run_dir: str
    """The run folder: prepared data (``encoded/``, ``data_summary.json``), metrics.jsonl, checkpoints."""
    tracking_uri: str
    """MLflow tracking URI the worker logs into (torchrun: redacted here, the real one in the environment)."""
    run_id: str | None = None
    """The MLflow run created by the driver; None when tracking is disabled."""
    launcher: str = "inline"
    """``ray`` (checkpoints and reports through Ray Train), ``torchrun`` or ``inline`` (files under run_dir)."""
    export_dir: str | None = None
    """Where the Hugging Face export goes (default ``RUN_DIR/export``)."""
    fingerprint: str | None = None
    """The run's fingerprint: recorded in and checked against every checkpoint."""
    invocation: str | None = None
    """An id of this driver call (a non-finite stop is not retried within the same invocation)."""
    hooks: tuple[HookSpec, ...] = ()
    """Callables run at the recipe's named points (:mod:`tract_dist.train.hooks`); none in production."""
    recipe: str = "train"
    """``train`` (TRACT's CoT-RAFT stages) or ``real`` (:class:`tract_dist.real.recipe.RealRecipe`)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (a deep copy): Ray Train's ``train_loop_config``, torchrun's ``loop.json``."""
        d = dataclasses.asdict(self)
        d["hooks"] = [dataclasses.asdict(h) for h in self.hooks]
        return json.loads(json.dumps(d))

    def to_json(self, *, redact: Callable[[str], str] | None = None) -> str:
        """JSON of the plan; ``redact`` is applied to the tracking URIs (a file must not hold a credential)."""
        d = self.to_dict()
        if redact is not None:
            d["tracking_uri"] = redact(d["tracking_uri"])
            tracking = d["config"].get("tracking") or {}
            if tracking.get("tracking_uri"):
                tracking["tracking_uri"] = redact(tracking["tracking_uri"])
        return json.dumps(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WorkerPlan:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"worker plan: unknown fields {sorted(unknown)}")
        hooks = tuple(HookSpec.from_dict(h) for h in d.get("hooks") or ())
        return cls(**{**dict(d), "hooks": hooks})

    @classmethod
    def coerce(cls, plan: WorkerPlan | Mapping[str, Any]) -> WorkerPlan:
        return plan if isinstance(plan, cls) else cls.from_dict(plan)
