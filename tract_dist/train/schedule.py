"""Learning-rate schedules as LambdaLR multipliers (their state is a step count: checkpoint-friendly)."""

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
