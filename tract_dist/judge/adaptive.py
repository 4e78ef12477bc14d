"""Adaptive CoT count (``evaluation.num_cots: auto``): sample an input's CoTs until the standard error of its
mean ŷ is small enough, instead of a fixed number for every input.

Why: CoT-RAIL averages ŷ over sampled CoTs (the paper reports 1 and 5; prometheus-7b-v2.0 gains most from five
samples, 0.607 -> 0.697 average Pearson, FIDELITY.md), but inputs differ: where every CoT reaches the same verdict
two or three samples say everything, where they disagree more samples pay. The rule:

- draw ``MIN_COTS`` CoTs, then stop as soon as se = s / sqrt(n) <= ``cot_se_target`` (s: the sample standard
  deviation of the n ŷ so far) or n = ``max_cots``;
- otherwise the next round draws up to the count the current estimate says is needed, ceil((s / target)²),
  at least one more and at most ``max_cots``: one batched engine call per round, not one per CoT. The rule is
  checked again after every round, so a round that overshot an early estimate costs samples, never a wrong stop.

CoT j of an input is the same sample whichever round draws it (its seed depends on the input's id and j only),
so ``auto`` reads the same first CoTs as a fixed count would.
"""

from __future__ import annotations

import math
import statistics

MIN_COTS = 3  # the first stop: with 2 samples s has one degree of freedom, and two CoTs that agree by chance
# (likely: ŷ of one verdict lands within a few hundredths) would stop an input whose verdicts do differ.


def standard_error(ys: list[float]) -> float:
    """s / sqrt(n) of the mean of ``ys`` (sample standard deviation); inf below two values."""
    if len(ys) < 2:
        return math.inf
    return statistics.stdev(ys) / math.sqrt(len(ys))


def converged(ys: list[float], target: float, max_cots: int) -> bool:
    """Whether an input with read-outs ``ys`` needs no more CoTs."""
    return len(ys) >= max_cots or (len(ys) >= MIN_COTS and standard_error(ys) <= target)


def next_count(ys: list[float], target: float, max_cots: int) -> int:
    """How many CoTs the input should have after the next round (its current count when converged)."""
    n = len(ys)
    if converged(ys, target, max_cots):
        return n
    if n < MIN_COTS:
        return min(MIN_COTS, max_cots)
    needed = math.ceil((statistics.stdev(ys) / target) ** 2)
    return min(max_cots, max(n + 1, needed))
