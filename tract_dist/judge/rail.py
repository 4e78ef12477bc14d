"""RAIL read-out: the score distribution at the one position that predicts the score, and its expectation.

ŷ = Σ_k v_k · p(token_k), with p the full-vocabulary softmax at the last position of
``<prompt><CoT> So the overall score is`` — the same quantity the CoT-RAFT loss regresses in training.
``normalize=True`` renormalises over the score tokens (ŷ = Σ v_k p_k / Σ p_k).

The probabilities come from the engine (``InferenceEngine.score_probs``): the HF backend's float64 softmax of
one forward pass, or vLLM's float32 full-vocabulary log-softmax at the requested ids. The expectation is taken
here in float64, the same way for both.

Multi-token scales (``data.score_scale``: "10" is "1", "0" for Mistral): p(v) is the product of the conditional
probabilities of v's tokens, read at every node of the values' trie (:func:`trie_readouts`): the position after
the score phrase and the position after each internal node's tokens. The HF backend computes all nodes of a
sequence in one forward (``HFEngine.score_trie_probs``: the node tokens appended with a tree attention mask);
otherwise (vLLM) each node is the sequence plus the node's tokens, read with ``score_probs``, which is exact (the
full-vocabulary log-softmax at the requested ids, not a top-k list) and whose requests share the sequence's
cached prefix blocks.
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


def trie_probs(engine: Any, sequences: list[list[int]], scale: Any) -> list[list[float]]:
    """p(v) for every value of a multi-token ``scale`` (``ScoreScale``) after each sequence, in score order."""
    trie = scale.trie
    if hasattr(engine, "score_trie_probs"):
        per_node = engine.score_trie_probs(sequences, [list(n) for n in trie.nodes], list(trie.edge_ids))
    else:  # one request per (sequence, node): the sequence followed by the node's tokens
        flat = engine.score_probs([s + list(n) for s in sequences for n in trie.nodes], list(trie.edge_ids))
        n_nodes = len(trie.nodes)
        per_node = [flat[i * n_nodes:(i + 1) * n_nodes] for i in range(len(sequences))]
    out = []
    for nodes in per_node:  # float64 products along each value's path
        row = []
        for path in trie.paths:
            p = 1.0
            for n, j in path:
                p *= nodes[n][j]
            row.append(p)
        out.append(row)
    return out


def scale_readouts(engine: Any, sequences: list[list[int]], scale: Any, *, normalize: bool = False
                   ) -> list[RailReadout]:
    """RAIL read-outs of any scale: single-token scales exactly as before (one ``score_probs`` at the score
    position), multi-token scales through the trie (:func:`trie_probs`)."""
    if scale.single_token:
        probs = engine.score_probs(sequences, [s[0] for s in scale.sequences])
    else:
        probs = trie_probs(engine, sequences, scale)
    return readouts(probs, scale.scores, normalize=normalize)


def score_distribution(model: Any, sequences: list[list[int]], token_ids: list[int], values: list[int], *,
                       pad_id: int, normalize: bool = False, batch_size: int = 8) -> list[RailReadout]:
    """The RAIL read-out of a loaded transformers model: one forward pass per batch of ``batch_size``."""
    from tract_dist.runtime.hf_engine import score_token_probs

    probs: list[list[float]] = []
    for start in range(0, len(sequences), batch_size):
        probs += score_token_probs(model, sequences[start:start + batch_size], token_ids, pad_id=pad_id)
    return readouts(probs, values, normalize=normalize)
