"""RAIL read-out: the score distribution at the one position that predicts the score, and its expectation.

ŷ = Σ_k v_k · p(token_k), with p the full-vocabulary softmax (float64) at the last position of
``<prompt><CoT> So the overall score is`` — the same quantity the CoT-RAFT loss regresses in training.
``normalize=True`` renormalises over the score tokens (ŷ = Σ v_k p_k / Σ p_k).

Sequences are left-padded with explicit position ids so every row's last token sits at the final column and
only that column's logits are computed (``logits_to_keep=1``): a batch never materialises L × vocab logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RailReadout:
    score: float  # ŷ
    probs: list[float]  # full-vocabulary probability of each score token, in score order
    mass: float  # Σ_k p_k: how much of the distribution the score tokens hold


@torch.no_grad()
def score_distribution(model: torch.nn.Module, sequences: list[list[int]], token_ids: list[int],
                       values: list[int], *, pad_id: int, normalize: bool = False,
                       batch_size: int = 8) -> list[RailReadout]:
    """One forward pass per batch; read the score distribution after the last token of each sequence."""
    device = next(model.parameters()).device
    out: list[RailReadout] = []
    tok = torch.tensor(token_ids, device=device)
    vals = torch.tensor(values, dtype=torch.float64, device=device)
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=1, use_cache=False).logits[:, -1, :]
        probs = torch.softmax(logits.to(torch.float64), dim=-1)[:, tok]  # full-vocabulary softmax, float64
        mass = probs.sum(-1)
        scores = (probs * vals).sum(-1) / (mass if normalize else 1.0)
        for i in range(len(chunk)):
            out.append(RailReadout(score=float(scores[i]), probs=probs[i].tolist(), mass=float(mass[i])))
    return out
