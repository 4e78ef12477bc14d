"""Public entry point of the CoT-RAFT joint loss (CE over CoT tokens + lam * MSE of the expected score)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._common import validate_inputs
from .fused import FusedCoTRaftFunction, FusedInputs
from .reference import reference_loss


@dataclass
class CoTRaftLossOutput:
    """``loss`` is differentiable; the rest is detached diagnostics of this call.

    ``ce`` = sum NLL / ce_denominator, ``mse`` = sum (yhat - y)^2 / mse_denominator (not scaled by lam),
    ``loss`` = ce + lam * mse. Counts are local to this call.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    mse: torch.Tensor
    yhat: torch.Tensor
    n_ce_tokens: int
    n_score_rows: int


def cot_raft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    score_rows: torch.Tensor,
    score_targets: torch.Tensor,
    score_token_ids: torch.Tensor,
    score_values: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    lam: float = 1.0,
    rail_normalize: bool = False,
    ce_on_score_token: bool = False,
    ce_denominator: float | int | torch.Tensor | None = None,
    mse_denominator: float | int | torch.Tensor | None = None,
    impl: str = "fused",
    chunk_size: int | None = None,
    vocab_shard: int | None = None,
    process_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> CoTRaftLossOutput:
    """CoT-RAFT loss from final hidden states and the lm_head, without N x V logits when fused.

    Args:
        hidden: (N, H) hidden states; row i predicts ``targets[i]`` (-100 = ignored).
        weight / bias: lm_head (V, H) / (V,); with ``process_group`` this rank's contiguous vocab shard
            (uneven shards allowed: the layout is all-gathered; ``vocab_start`` is checked against it).
        score_rows: (M,) unique row indices whose next-token distribution predicts the score.
        score_targets: (M,) gold scores (float, may be non-integer).
        score_token_ids / score_values: (K,) unique score token ids (global) and their values.
        lam: weight of the MSE term. rail_normalize: renormalise p over the K score tokens.
        ce_on_score_token: score rows also get a CE target, the score token whose value is nearest to
            the gold score (ties -> first in ``score_token_ids``); it replaces ``targets`` at that row
            and counts once in the CE token count.
        ce_denominator / mse_denominator: global CE token / score row counts of the whole batch, so
            that micro-batches or data-parallel ranks add up to the big-batch gradient; default local.
        impl: "fused" (chunked, gradients computed in forward) or "reference" (materialised logits).
        chunk_size / vocab_shard: tile of the fused path (default: one vocab shard up to 131072 rows,
            chunk sized to a 2^25-element logits tile).
        process_group: vocab-parallel group; grad w.r.t. ``hidden`` is summed over it inside the loss.
    """
    validate_inputs(hidden, weight, targets, score_rows, score_targets, score_token_ids, score_values, bias)
    common = dict(
        lam=lam,
        rail_normalize=rail_normalize,
        ce_on_score_token=ce_on_score_token,
        ce_denominator=ce_denominator,
        mse_denominator=mse_denominator,
    )
    if impl == "reference":
        if process_group is not None and dist.get_world_size(process_group) > 1:
            raise NotImplementedError("impl='reference' is unsharded; gather the weight or use impl='fused'")
        r = reference_loss(
            hidden, weight, targets, score_rows, score_targets, score_token_ids, score_values, bias=bias, **common
        )
        return CoTRaftLossOutput(r.loss, r.ce, r.mse, r.yhat, r.n_ce_tokens, r.n_score_rows)
    if impl != "fused":
        raise ValueError(f"impl must be 'fused' or 'reference', got {impl!r}")
    inp = FusedInputs(
        targets=targets,
        score_rows=score_rows,
        score_targets=score_targets,
        score_token_ids=score_token_ids,
        score_values=score_values,
        chunk_size=chunk_size,
        vocab_shard=vocab_shard,
        process_group=process_group,
        vocab_start=vocab_start,
        **common,
    )
    loss, ce, mse, yhat = FusedCoTRaftFunction.apply(hidden, weight, bias, inp)
    n_ce, n_sc = _counts(targets, score_rows, ce_on_score_token)
    return CoTRaftLossOutput(loss, ce, mse, yhat, n_ce, n_sc)


def _counts(targets: torch.Tensor, score_rows: torch.Tensor, ce_on_score_token: bool) -> tuple[int, int]:
    valid = targets != -100
    if ce_on_score_token and score_rows.numel():
        valid = valid.clone()
        valid[score_rows] = True
    return int(valid.sum()), int(score_rows.numel())
