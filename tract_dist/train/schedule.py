"""Learning-rate schedules as LambdaLR multipliers (their state is a step count: checkpoint-friendly), and the
λ warm-up of the regression term (a pure function of the step, so a resumed run continues it exactly)."""

from __future__ import annotations

import math
from typing import Callable


def lr_lambda(kind: str, total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Linear warm-up over ``ceil(warmup_ratio * total)`` steps, then cosine / linear decay to 0, or constant."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(1.0, progress)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def lam_at(step: int, lam: float, warmup_steps: int) -> float:
    """λ in force at optimizer step ``step`` (0-based): ``lam * step / warmup_steps`` until it reaches ``lam``.

    Why a warm-up: at the start the read-out of a fresh model is far off, so the regression term's gradient
    dwarfs CE's (benchmarks/quality: mean gradient norm 47-53 over CoT-RAFT's first 10 steps against 3.7-4.0
    for CE alone, both clipped to 1) and the first updates mostly serve the read-out; ramping λ from 0 lets the
    CoT start learning first. Step 0 trains CE alone; ``warmup_steps`` 0 means ``lam`` from the start."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return lam
    return lam * step / warmup_steps
