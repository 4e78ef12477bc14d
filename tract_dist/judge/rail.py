"""RAIL read-out: the score distribution at the one position that predicts the score, and its expectation.

ŷ = Σ_k v_k · p(token_k), with p the full-vocabulary softmax at the last position of
``<prompt><CoT> So the overall score is`` — the same quantity the CoT-RAFT loss regresses in training.
``normalize=True`` renormalises over the score tokens (ŷ = Σ v_k p_k / Σ p_k).

The probabilities come from the engine (``InferenceEngine.score_probs``): the HF backend's float64 softmax of
one forward pass, or vLLM's float32 full-vocabulary log-softmax at the requested ids. The expectation is taken
here in float64, the same way for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class RailReadout:
    score: float  # ŷ
    probs: list[float]  # full-vocabulary probability of each score token, in score order
    mass: float  # Σ_k p_k: how much of the distribution the score tokens hold


def readouts(probs: list[list[float]], values: list[int] | tuple[int, ...], *,
             normalize: bool = False) -> list[RailReadout]:
    """ŷ and the score mass for each row of score-token probabilities (float64 arithmetic)."""
    out = []
    for p in probs:
        mass = float(sum(p))
        score = sum(v * q for v, q in zip(values, p)) / (mass if normalize else 1.0)
        out.append(RailReadout(score=float(score), probs=[float(q) for q in p], mass=mass))
    return out


def score_distribution(model: Any, sequences: list[list[int]], token_ids: list[int], values: list[int], *,
                       pad_id: int, normalize: bool = False, batch_size: int = 8) -> list[RailReadout]:
    """The RAIL read-out of a loaded transformers model: one forward pass per batch of ``batch_size``."""
    from tract_dist.runtime.hf_engine import score_token_probs

    probs: list[list[float]] = []
    for start in range(0, len(sequences), batch_size):
        probs += score_token_probs(model, sequences[start:start + batch_size], token_ids, pad_id=pad_id)
    return readouts(probs, values, normalize=normalize)
