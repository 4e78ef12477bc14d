"""Test-only helpers for tests/models: batches, an independent loss from HF's full logits, loss impls.

The reference here is written per example and per position (Python loops over HF's (B, T, V) logits),
so it shares no row-selection code with ``tract_dist.models.cot_raft``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100
SCORE_TOKEN_IDS = [11, 12, 13, 14, 15]  # stand-ins for the digits "1".."5"
SCORE_VALUES = [1.0, 2.0, 3.0, 4.0, 5.0]


def make_batch(seed: int, batch: int = 3, seq: int = 16, vocab: int = 512, with_unscored: bool = False) -> dict:
    """Right-padded batch: prompt (-100 labels), CoT tokens, the score token, one trailing token, padding."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(20, vocab, (batch, seq), generator=gen)
    attention_mask = torch.zeros(batch, seq, dtype=torch.long)
    labels = torch.full((batch, seq), IGNORE)
    score_positions = torch.empty(batch, dtype=torch.long)
    score_targets = torch.empty(batch, dtype=torch.float32)
    for b in range(batch):
        length = int(torch.randint(seq - 5, seq + 1, (1,), generator=gen))
        prompt = int(torch.randint(2, 5, (1,), generator=gen))
        attention_mask[b, :length] = 1
        labels[b, prompt:length] = input_ids[b, prompt:length]
        pos = length - 3  # predicts the score token at length - 2; one token (think EOS) follows it
        gold = float(torch.randint(2, 10, (1,), generator=gen)) / 2.0  # 1.0 .. 4.5, halves included
        nearest = SCORE_TOKEN_IDS[min(range(5), key=lambda k: abs(SCORE_VALUES[k] - gold))]
        input_ids[b, pos + 1] = nearest
        labels[b, pos + 1] = nearest
        score_positions[b] = pos
        score_targets[b] = gold
    if with_unscored:
        score_positions[-1] = -1
    input_ids[attention_mask == 0] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "score_positions": score_positions,
        "score_targets": score_targets,
    }


def concat_batches(*batches: dict) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _nearest_token(gold: float) -> int:
    dist = [abs(v - gold) for v in SCORE_VALUES]
    return SCORE_TOKEN_IDS[dist.index(min(dist))]  # ties go to the first (lower) value


def loss_from_full_logits(
    logits: torch.Tensor,
    batch: dict,
    *,
    lam: float = 1.0,
    rail_normalize: bool = False,
    ce_on_score_token: bool = False,
    ce_denominator: float | None = None,
    mse_denominator: float | None = None,
) -> SimpleNamespace:
    """The CoT-RAFT objective written out per example from HF's (B, T, V) logits, in float64."""
    logits = logits.double()
    labels, positions, golds = batch["labels"], batch["score_positions"], batch["score_targets"]
    nll, sq, yhat = [], [], []
    ids = torch.tensor(SCORE_TOKEN_IDS)
    values = torch.tensor(SCORE_VALUES, dtype=torch.float64)
    batch_size, seq = labels.shape
    for b in range(batch_size):
        s = int(positions[b])
        for t in range(seq):
            target = int(labels[b, t + 1]) if t + 1 < seq else IGNORE
            if t == s:
                target = _nearest_token(float(golds[b])) if ce_on_score_token else IGNORE
            if target != IGNORE:
                nll.append(-F.log_softmax(logits[b, t], dim=-1)[target])
        if s >= 0:
            if rail_normalize:
                p = torch.softmax(logits[b, s, ids], dim=-1)
            else:
                p = torch.softmax(logits[b, s], dim=-1)[ids]
            yhat.append((p * values).sum())
            sq.append((yhat[-1] - float(golds[b])) ** 2)
    ce = torch.stack(nll).sum() / (ce_denominator if ce_denominator is not None else len(nll))
    mse = torch.stack(sq).sum() / (mse_denominator if mse_denominator is not None else len(sq))
    return SimpleNamespace(loss=ce + lam * mse, ce=ce, mse=mse, yhat=torch.stack(yhat), n_ce=len(nll), n_sc=len(sq))


def loss_impls() -> list[tuple[str, Any]]:
    """(impl, loss_fn) pairs every loss-level test runs: the real loss entry point, fused and reference."""
    from tract_dist.loss import cot_raft_loss_with_options

    return [("fused", cot_raft_loss_with_options), ("reference", cot_raft_loss_with_options)]


def loss_options(impl: str = "fused", **settings: Any):
    """The loss options of these tests' score scale; ``settings`` are CoTRaftLossOptions fields."""
    from tract_dist.loss import CoTRaftLossOptions

    return CoTRaftLossOptions(SCORE_TOKEN_IDS, SCORE_VALUES, impl=impl, **settings)


def split_options(opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(loss settings, per-call denominators) of a test's option dict."""
    calls = {k: v for k, v in opts.items() if k in ("ce_denominator", "mse_denominator")}
    return {k: v for k, v in opts.items() if k not in calls}, calls


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}
