"""The check ``train``, ``pipeline`` and ``submit`` run before anything starts: will the run fit?

An out-of-memory error after a 70B model has loaded on 32 GPUs is the most expensive bad input there is, so the
commands plan the run first and refuse (exit 2, naming what to change) when a stage's per-GPU estimate exceeds the
device's memory, and warn when it is within ``plan.margin`` of it. ``--no-plan-check`` skips the check and
``plan.check=warn`` downgrades a refusal to a warning. CPU runs are only warned about, against this machine's
memory. A model whose config cannot be read without a download is not checked (a warning says why).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tract_dist.errors import TractError
from tract_dist.plan.hardware import GIB

if TYPE_CHECKING:
    from tract_dist.config import Config

#: Which stage kinds each command runs (``submit`` follows the command it submits).
COMMAND_KINDS = {"train": ("train",), "pipeline": ("pipeline_train", "generate", "pipeline_evaluate"),
                 "generate": ("generate",), "evaluate": ("evaluate",)}


class PlanRefused(TractError):
    """The plan says the run will not fit; the message names the stage, the estimate and what to change."""


def _advice(stage_name: str) -> str:
    if stage_name.startswith("train"):
        return ("lower training.micro_batch_size or data.max_length, turn on model.gradient_checkpointing or "
                "model.lora.enabled, or add workers (cluster.num_workers)")
    return ("raise the stage's tensor_parallel_size, lower generation.vllm.max_model_len or "
            "generation.vllm.max_num_seqs")


def plan_check(cfg: Config, command: str = "train", *, local: bool = True) -> list[str]:
    """Plan ``cfg`` for ``command``'s stages; raise :class:`PlanRefused` when a stage will not fit (unless
    ``plan.check`` is warn). Returns the lines for the user (warnings for tight stages, else one summary line):
    the entry point prints them. A CPU run is checked against this machine's memory only when it runs here
    (``local``)."""
    lines: list[str] = []
    if not cfg.cluster.use_gpu and not local:  # a CPU job elsewhere: nothing here to check it against
        return lines
    from tract_dist.plan.report import host_memory_bytes, plan_run
    from tract_dist.plan.shape import PlanUnavailable

    try:
        plan = plan_run(cfg, kinds=COMMAND_KINDS.get(command, ("train",)))
    except PlanUnavailable as e:
        lines.append(f"[plan] warning: not checked: {e}")
        return lines
    if plan.accelerator is None:  # CPU: the local workers share this machine's memory
        need = sum(s.memory.total * s.units for s in plan.stages if s.name.startswith("train")) / max(
            sum(1 for s in plan.stages if s.name.startswith("train")), 1)
        have = host_memory_bytes()
        if need > have:
            lines.append(f"[plan] warning: training needs about {need / GIB:.1f} GiB of tensors over its workers, "
                         f"this machine has {have / GIB:.1f} GiB (tract-dist plan shows the parts)")
        return lines
    failing = plan.failing()
    for s in plan.tight():
        lines.append(f"[plan] warning: {s.name}: {s.memory.total / GIB:.1f} GiB of {s.limit_bytes / GIB:.1f} GiB "
                     f"per GPU is tight (the plan leaves {cfg.plan.margin:.0%} for what it does not count)")
    if failing:
        # Stages with the same estimate (stage 1 and stage 2 train alike) are named together, said once.
        groups: dict[tuple[int, str], list[str]] = {}
        for s in failing:
            top = sorted(s.memory.components, key=lambda c: c.bytes, reverse=True)[:3]
            parts = ", ".join(f"{c.name} {c.bytes / GIB:.1f}" for c in top)
            why = "; ".join(s.notes) if s.notes else ""
            text = (f"about {s.memory.total / GIB:.1f} GiB per GPU ({parts} GiB) on {plan.accelerator.name} with "
                    f"{plan.accelerator.memory_gib:.1f} GiB{': ' + why if why else ''}: {_advice(s.name)}")
            groups.setdefault((s.memory.total, text), []).append(s.name)
        needs = [f"{' and '.join(names)} need{'s' if len(names) == 1 else ''} {text}"
                 for (_, text), names in groups.items()]
        msg = "the run will not fit: " + "; ".join(needs) + " (details: tract-dist plan CONFIG; skip: --no-plan-check)"
        if cfg.plan.check == "warn":
            lines.append(f"[plan] warning: {msg}")
            return lines
        raise PlanRefused(msg)
    worst = max(plan.stages, key=lambda s: s.memory.total / (s.limit_bytes or 1), default=None)
    if worst is not None:
        lines.append(f"[plan] fits: largest {worst.name} {worst.memory.total / GIB:.1f} GiB of "
                     f"{worst.limit_bytes / GIB:.1f} GiB per GPU ({plan.accelerator.name})")
    return lines
