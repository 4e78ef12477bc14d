"""Public entry points of the CoT-RAFT joint loss (CE over CoT tokens + lam * MSE of the expected score).

``cot_raft_loss`` takes every setting as a keyword (the documented signature); training code builds a
:class:`CoTRaftLossOptions` once and calls ``cot_raft_loss_with_options`` on every micro-batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ._common import CoTRaftLossOutput, compute_dtype, node_rows, validate_inputs, validate_values
from .fused import Denominator, FusedCoTRaftFunction, FusedCounts
from .options import CoTRaftLossOptions, Impl, Kernel
from .reference import reference_loss


def cot_raft_loss_with_options(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    score_rows: torch.Tensor,
    score_targets: torch.Tensor,
    options: CoTRaftLossOptions,
    *,
    bias: torch.Tensor | None = None,
    ce_denominator: Denominator = None,
    mse_denominator: Denominator = None,
    ce_weights: torch.Tensor | None = None,
    mse_weights: torch.Tensor | None = None,
    lam: float | None = None,
    score_branch_rows: torch.Tensor | None = None,
) -> CoTRaftLossOutput:
    """The CoT-RAFT loss of one (micro-)batch under fixed ``options``; see :func:`cot_raft_loss`. ``lam``
    overrides ``options.lam`` for this call (a warm-up schedule changes it every step)."""
    cdt = compute_dtype(hidden.dtype)
    ids, values = options.score_tensors(hidden.device, cdt)
    multi = options.score_sequences is not None
    validate_inputs(hidden, weight, targets, score_rows, score_targets, ids, values, bias, ce_weights, mse_weights,
                    multi_token=multi)
    if not multi and score_branch_rows is not None:
        raise ValueError("score_branch_rows given for a scale of single-token values")
    if lam is not None and not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if options.impl == "reference":
        group = options.process_group
        if group is not None and dist.get_world_size(group) > 1:
            raise NotImplementedError("impl='reference' is unsharded; gather the weight or use impl='fused'")
        rows = node_rows(score_rows, score_branch_rows, options.num_score_nodes) if multi else None
        validate_values(score_rows if rows is None else rows.flatten(), ids)
        return reference_loss(
            hidden, weight, targets, score_rows, score_targets, ids, values, bias=bias,
            lam=options.lam if lam is None else lam,
            rail_normalize=options.rail_normalize, ce_on_score_token=options.ce_on_score_token,
            ce_denominator=ce_denominator, mse_denominator=mse_denominator, ce_weights=ce_weights,
            mse_weights=mse_weights, trie=options.trie_tensors(hidden.device, cdt) if multi else None,
            node_rows=rows,
        )
    if multi:
        score_branch_rows = node_rows(score_rows, score_branch_rows, options.num_score_nodes)[:, 1:]
    counts = FusedCounts()
    loss, ce, mse, yhat = FusedCoTRaftFunction.apply(
        hidden, weight, bias, targets, score_rows, score_targets, options, ce_denominator, mse_denominator, counts,
        ce_weights, mse_weights, lam, score_branch_rows,
    )
    return CoTRaftLossOutput(loss, ce, mse, yhat, counts.n_ce_tokens, counts.n_score_rows)


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
    ce_denominator: Denominator = None,
    mse_denominator: Denominator = None,
    ce_weights: torch.Tensor | None = None,
    mse_weights: torch.Tensor | None = None,
    impl: Impl = "fused",
    chunk_size: int | None = None,
    vocab_shard: int | None = None,
    process_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    kernel: Kernel = "auto",
    tile_bytes: int | None = None,
    score_sequences: list[list[int]] | None = None,
    score_branch_rows: torch.Tensor | None = None,
) -> CoTRaftLossOutput:
    """CoT-RAFT loss from final hidden states and the lm_head, without N x V logits when fused.

    Args:
        hidden: (N, H) hidden states; row i predicts ``targets[i]`` (``protocol.IGNORE_INDEX`` = -100: ignored).
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
        ce_weights / mse_weights: optional real weights, (N,) one per row on its CE term and (M,) one per
            score row on its squared error; a sequence weight w_s is given as w_s on each of the sequence's
            rows and on its score row. Signed values are allowed (a policy-gradient term weights CE by an
            advantage). The denominators stay counts: a weight scales its sequence's contribution, and
            weights of 1 give exactly the unweighted loss.
        impl: "fused" (chunked, gradients computed in forward) or "reference" (materialised logits).
        chunk_size / vocab_shard / tile_bytes: tiles of the fused path (default: one vocab shard up to
            131072 rows, as many active rows as the device's tile budget holds; ``loss/tiling.py``).
        process_group: vocab-parallel group; grad w.r.t. ``hidden`` is summed over it inside the loss.
        kernel: "auto" (Triton on CUDA), "torch" or "triton" for the fused path's elementwise work.
        score_sequences: (K,) token sequences of the values of a multi-token scale (``data.score_scale``;
            ``score_token_ids`` then empty): p(v) is the product of the conditional probabilities of v's
            tokens, read at the rows of the trie's nodes: ``score_rows`` (the root) and
            ``score_branch_rows`` (M, N - 1), the row after each internal node's tokens, in trie order.
    """
    options = CoTRaftLossOptions(
        score_token_ids, score_values, lam=lam, rail_normalize=rail_normalize,
        ce_on_score_token=ce_on_score_token, impl=impl, kernel=kernel, chunk_size=chunk_size,
        vocab_shard=vocab_shard, tile_bytes=tile_bytes, process_group=process_group, vocab_start=vocab_start,
        score_sequences=score_sequences,
    )
    return cot_raft_loss_with_options(
        hidden, weight, targets, score_rows, score_targets, options, bias=bias,
        ce_denominator=ce_denominator, mse_denominator=mse_denominator, ce_weights=ce_weights,
        mse_weights=mse_weights, score_branch_rows=score_branch_rows,
    )
