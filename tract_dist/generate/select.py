"""Stage-2 selection: which of the stage-1 model's own CoTs stage 2 trains on, and with what weight, judged by
each CoT's own RAIL read-out ŷ against the gold score y* of its prompt.

Why: stage 2 copies whatever the stage-1 model wrote, wrong verdicts included (benchmarks/quality). When the
stage-2 data are built, both numbers are known for every CoT: y* from the training set, ŷ from the read-out the
generation stored with the CoT (``generate/worker.py``). A CoT whose own read-out lands far from y* is evidence
of wrong reasoning, so ``generation.select`` uses |ŷ - y*|:

- ``all``: every usable CoT, weight 1 (the paper's stage 2).
- ``nearest``: per prompt, the CoT with the smallest |ŷ - y*| (ties: the lowest CoT index).
- ``within``: every CoT with |ŷ - y*| <= ``generation.select_tolerance`` (τ).
- ``weighted``: every CoT, with a weight that falls with its error:

      w_j = n_p · exp(-e_j² / (2τ²)) / Σ_{i ∈ p} exp(-e_i² / (2τ²)),    e_j = ŷ_j - y*,  n_p = the prompt's CoTs

  i.e. the posterior over a prompt's sampled CoTs given its gold score, when ŷ is read as a Gaussian
  measurement of y* with noise τ (self-normalised importance weights, the E-step of EM over the CoT as a latent
  variable, as in reward-weighted regression with reward -e²). Normalised *per prompt* to mean 1 so that every
  prompt keeps the total weight it has under ``all`` (selection must not tilt the data towards the prompts the
  model already judges well, which hard filtering does), and the loss keeps its scale: the training loss divides
  by counts, not by weight sums (``tract_dist/loss/README.md``).

A CoT is *acceptable* when |ŷ - y*| <= τ. Under ``nearest``, ``within`` and ``weighted`` a prompt with no
acceptable CoT follows ``generation.select_fallback``: ``nearest`` keeps its nearest CoT (``nearest`` and ``within``; under ``weighted``
its CoTs stay, their weight concentrated on the nearest by the normalisation), ``drop`` removes the prompt from
stage 2. Either way it is counted (``prompts_without_acceptable``, ``prompts_dropped``). CoTs without a read-out
(generated before read-outs were stored) are kept by ``all`` and counted and left out by the other rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

SelectRule = Literal["all", "nearest", "within", "weighted"]
Fallback = Literal["nearest", "drop"]
SELECT_RULES: tuple[str, ...] = ("all", "nearest", "within", "weighted")
FALLBACKS: tuple[str, ...] = ("nearest", "drop")
REPORT_WITHIN = 0.5  # the share of CoTs within this distance of y* is always reported (any τ): half a score point


@dataclass(frozen=True)
class SelectionSpec:
    """The selection settings (``generation.select``, ``select_tolerance``, ``select_fallback``)."""

    rule: SelectRule = "all"
    tolerance: float = 0.5
    fallback: Fallback = "nearest"

    def __post_init__(self) -> None:
        if self.rule not in SELECT_RULES:
            raise ValueError(f"select rule must be one of {', '.join(SELECT_RULES)}, got {self.rule!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"select fallback must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"select tolerance must be a finite number >= 0, got {self.tolerance!r}")
        if self.rule == "weighted" and self.tolerance == 0:
            raise ValueError("select rule 'weighted' needs a tolerance > 0 (the width of its weight)")

    @classmethod
    def from_config(cls, gen: Any) -> "SelectionSpec":
        return cls(rule=gen.select, tolerance=gen.select_tolerance, fallback=gen.select_fallback)

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "tolerance": self.tolerance, "fallback": self.fallback}


@dataclass(frozen=True)
class Candidate:
    """One usable CoT: its uid, its prompt (example id), its CoT index, its read-out (None: none stored) and
    the prompt's gold score."""

    uid: str
    prompt: str
    index: int
    yhat: float | None
    gold: float

    @property
    def error(self) -> float | None:
        return None if self.yhat is None else abs(self.yhat - self.gold)


def select_cots(candidates: list[Candidate], spec: SelectionSpec) -> tuple[list[tuple[Candidate, float]],
                                                                           dict[str, Any]]:
    """The kept CoTs with their weights (input order) and the selection's statistics (see the module doc)."""
    by_prompt: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_prompt.setdefault(c.prompt, []).append(c)
    weight: dict[str, float] = {}
    no_readout = 0
    without_acceptable = 0
    by_fallback = 0
    dropped_prompts = 0
    for cands in by_prompt.values():
        read = [c for c in cands if c.yhat is not None]
        no_readout += len(cands) - len(read)
        acceptable = [c for c in read if c.error <= spec.tolerance]  # type: ignore[operator]
        without_acceptable += bool(read) and not acceptable
        if spec.rule == "all":  # no selection: the fallback does not apply
            weight.update({c.uid: 1.0 for c in cands})
            continue
        if not read:
            dropped_prompts += 1
            continue
        if not acceptable:
            if spec.fallback == "drop":
                dropped_prompts += 1
                continue
            by_fallback += 1
        nearest = min(read, key=lambda c: (c.error, c.index))
        if spec.rule == "nearest" or (spec.rule == "within" and not acceptable):
            weight[nearest.uid] = 1.0
        elif spec.rule == "within":
            weight.update({c.uid: 1.0 for c in acceptable})
        else:
            weight.update(_posterior_weights(read, spec.tolerance))
    kept = [(c, weight[c.uid]) for c in candidates if c.uid in weight]
    stats = {**spec.as_dict(),
             "prompts": len(by_prompt), "cots_before": len(candidates), "kept": len(kept),
             "dropped": len(candidates) - len(kept), "no_readout": no_readout,
             "prompts_kept": len({c.prompt for c, _ in kept}), "prompts_dropped": dropped_prompts,
             "prompts_without_acceptable": without_acceptable, "prompts_kept_by_fallback": by_fallback,
             **_error_stats([(c, 1.0) for c in candidates], spec.tolerance, "before"),
             **_error_stats(kept, spec.tolerance, "after")}
    if spec.rule == "weighted" and kept:
        ws = [w for _, w in kept]
        stats.update(weight_min=min(ws), weight_max=max(ws), weight_mean=sum(ws) / len(ws))
    return kept, stats


def _posterior_weights(cands: list[Candidate], tau: float) -> dict[str, float]:
    """n · softmax(-e² / 2τ²) over one prompt's CoTs (log-sum-exp: far-off CoTs underflow to 0, not NaN)."""
    logits = [-((c.yhat - c.gold) ** 2) / (2 * tau * tau) for c in cands]  # type: ignore[operator]
    top = max(logits)
    expd = [math.exp(x - top) for x in logits]
    total = sum(expd)
    return {c.uid: len(cands) * e / total for c, e in zip(cands, expd)}


def _error_stats(pairs: list[tuple[Candidate, float]], tau: float, when: str) -> dict[str, float | None]:
    """Weighted mean |ŷ - y*| and the weighted shares within τ and within 0.5, over CoTs with a read-out."""
    read = [(c.error, w) for c, w in pairs if c.error is not None]
    total = sum(w for _, w in read)
    if not read or total <= 0:
        return {f"mae_{when}": None, f"within_tolerance_{when}": None, f"within_0.5_{when}": None}
    return {f"mae_{when}": sum(e * w for e, w in read) / total,
            f"within_tolerance_{when}": sum(w for e, w in read if e <= tau) / total,
            f"within_0.5_{when}": sum(w for e, w in read if e <= REPORT_WITHIN) / total}


def summary_line(stats: dict[str, Any]) -> str:
    """One console line: what the rule kept and dropped and how far the kept CoTs' ŷ lie from y*."""
    def num(x: Any) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    line = (f"select={stats['rule']} (tolerance {stats['tolerance']:g}, fallback {stats['fallback']}): kept "
            f"{stats['kept']} of {stats['cots_before']} CoTs for {stats['prompts_kept']} of {stats['prompts']} "
            f"prompts, dropped {stats['dropped']} CoTs and {stats['prompts_dropped']} prompts "
            f"({stats['prompts_without_acceptable']} without a CoT within tolerance); mean |ŷ - y*| "
            f"{num(stats['mae_before'])} -> {num(stats['mae_after'])}, within 0.5 {num(stats['within_0.5_before'])}"
            f" -> {num(stats['within_0.5_after'])}")
    if stats.get("no_readout"):
        line += f"; {stats['no_readout']} CoTs had no read-out"
    return line
