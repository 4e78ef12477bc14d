"""Plain reference of the CoT-RAFT loss: materialises all N x V logits and relies on autograd.

This is the definition the fused kernel is tested against; it is deliberately naive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (IGNORE_INDEX, CoTRaftLossOutput, check_finite_weights, compute_dtype, effective_targets,
                      effective_targets_multi, resolve_denominator, value_logprobs)


def reference_loss(
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
    ce_weights: torch.Tensor | None = None,
    mse_weights: torch.Tensor | None = None,
    trie: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    node_rows: torch.Tensor | None = None,
) -> CoTRaftLossOutput:
    """CE (sum w NLL / ce_denominator) + lam * sum w (yhat - y)^2 / mse_denominator, via full logits.

    ``ce_weights`` (N,) weight each row's NLL, ``mse_weights`` (M,) each score row's squared error (None: 1);
    the denominators are counts, whatever the weights. ``trie`` (incidence, path nodes, path edges;
    ``CoTRaftLossOptions.trie_tensors``) and ``node_rows`` (M, N): a multi-token scale, whose ``score_token_ids``
    are the trie's edge tokens and p(v) the product of the edge probabilities along v's path."""
    check_finite_weights(ce_weights, mse_weights)
    cdt = compute_dtype(hidden.dtype)
    logits = hidden.to(cdt) @ weight.to(cdt).T
    if bias is not None:
        logits = logits + bias.to(cdt)
    logp = F.log_softmax(logits, dim=-1)

    if trie is None:
        tgt = effective_targets(targets, score_rows, score_targets, score_token_ids, score_values, ce_on_score_token)
    else:
        tgt = effective_targets_multi(targets, node_rows, score_targets, score_token_ids, score_values, trie[1],
                                      trie[2], ce_on_score_token)
    valid = tgt != IGNORE_INDEX
    n_ce = int(valid.sum())
    nll = -logp.gather(1, tgt.clamp_min(0).long()[:, None]).squeeze(1)
    nll = torch.where(valid, nll, 0.0)
    if ce_weights is not None:
        nll = nll * ce_weights.to(cdt)
    ce = nll.sum() / resolve_denominator(ce_denominator, n_ce, "ce_denominator")

    n_sc = int(score_rows.numel())
    values = score_values.to(cdt)
    if trie is not None:
        logpv = value_logprobs(logp[node_rows][:, :, score_token_ids], trie[0].to(cdt))
        probs = torch.softmax(logpv, dim=-1) if rail_normalize else logpv.exp()
    elif rail_normalize:
        probs = torch.softmax(logits[score_rows[:, None], score_token_ids[None, :]], dim=-1)
    else:
        probs = logp[score_rows[:, None], score_token_ids[None, :]].exp()
    yhat = probs @ values
    sq = (yhat - score_targets.to(cdt)) ** 2
    if mse_weights is not None:
        sq = sq * mse_weights.to(cdt)
    mse = sq.sum() / resolve_denominator(mse_denominator, n_sc, "mse_denominator")
    loss = ce + lam * mse
    return CoTRaftLossOutput(loss, ce.detach(), mse.detach(), yhat.detach(), n_ce, n_sc)
