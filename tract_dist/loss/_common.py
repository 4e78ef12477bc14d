"""The result shape, input checks and target resolution shared by the reference and the fused path.

Kept in one place so that both implementations agree on the *definition* of the objective
(which rows count for CE, which score token is the gold one); the numerics are independent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tract_dist.protocol import IGNORE_INDEX  # noqa: F401 - re-exported to reference.py / fused.py


@dataclass
class CoTRaftLossOutput:
    """``loss`` is differentiable; the rest is detached diagnostics of this call.

    ``ce`` = sum w NLL / ce_denominator, ``mse`` = sum w (yhat - y)^2 / mse_denominator (not scaled by lam;
    w = the per-row / per-score-row weights, 1 when none are given), ``loss`` = ce + lam * mse. Counts are local to this call. One shape for the reference and the fused
    path, so the public entry point returns either as it is.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    mse: torch.Tensor
    yhat: torch.Tensor
    n_ce_tokens: int
    n_score_rows: int


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else is reduced in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def nearest_score_token(
    score_targets: torch.Tensor, score_token_ids: torch.Tensor, score_values: torch.Tensor
) -> torch.Tensor:
    """Token id of the score value nearest to each (possibly non-integer) gold score.

    Ties (e.g. 2.5 between 2 and 3) go to the first score token in ``score_token_ids`` order,
    i.e. to the lower value when the scale is listed in ascending order.
    """
    dist = (score_targets.double()[:, None] - score_values.double()[None, :]).abs()
    return score_token_ids[dist.argmin(dim=1)]


def effective_targets(
    targets: torch.Tensor,
    score_rows: torch.Tensor,
    score_targets: torch.Tensor,
    score_token_ids: torch.Tensor,
    score_values: torch.Tensor,
    ce_on_score_token: bool,
) -> torch.Tensor:
    """CE targets after applying ``ce_on_score_token`` (score rows get their gold score token)."""
    if not ce_on_score_token or score_rows.numel() == 0:
        return targets
    tgt = targets.clone()
    tgt[score_rows] = nearest_score_token(score_targets, score_token_ids, score_values).to(tgt.dtype)
    return tgt


def resolve_denominator(given: float | int | torch.Tensor | None, count: int, name: str) -> float:
    """Local count by default; a global count (grad accumulation / data parallel) if given."""
    if given is None:
        return float(max(count, 1))  # count == 0 -> numerator is 0 too, value 0 not NaN
    value = float(given)
    if value <= 0:
        if count == 0:
            return 1.0
        raise ValueError(f"{name}={value} must be positive when this call has {count} items")
    return value


def validate_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    score_rows: torch.Tensor,
    score_targets: torch.Tensor,
    score_token_ids: torch.Tensor,
    score_values: torch.Tensor,
    bias: torch.Tensor | None,
    ce_weights: torch.Tensor | None = None,
    mse_weights: torch.Tensor | None = None,
    multi_token: bool = False,
) -> None:
    """Shape checks, without reading device values (the fused path checks values in its row plan).
    ``multi_token``: the ids are a trie's edge tokens, not one per value."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be (N,H), (V,H)")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must have shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if score_rows.dim() != 1 or score_targets.shape != score_rows.shape:
        raise ValueError("score_rows and score_targets must be 1-D of equal length")
    if score_token_ids.dim() != 1 or score_values.dim() != 1 or (
            score_values.shape != score_token_ids.shape and not multi_token):
        raise ValueError("score_token_ids and score_values must be 1-D of equal length")
    if score_rows.numel() and score_token_ids.numel() == 0:
        raise ValueError("score rows given but no score tokens")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},)")
    if ce_weights is not None and ce_weights.shape != targets.shape:
        raise ValueError(f"ce_weights must have shape ({targets.shape[0]},) (one per row), got "
                         f"{tuple(ce_weights.shape)}")
    if mse_weights is not None and mse_weights.shape != score_rows.shape:
        raise ValueError(f"mse_weights must have shape ({score_rows.shape[0]},) (one per score row), got "
                         f"{tuple(mse_weights.shape)}")
    for name, w in (("ce_weights", ce_weights), ("mse_weights", mse_weights)):
        if w is not None and not w.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {w.dtype}")


def validate_values(score_rows: torch.Tensor, score_token_ids: torch.Tensor) -> None:
    """Duplicate score rows / score tokens are rejected (ambiguous semantics); reads device values."""
    if score_rows.numel() and torch.unique(score_rows).numel() != score_rows.numel():
        raise ValueError("score_rows must be unique")
    if torch.unique(score_token_ids).numel() != score_token_ids.numel():
        raise ValueError("score_token_ids must be unique")


def check_finite_weights(*weights: torch.Tensor | None) -> None:
    """Non-finite weights are rejected (reads device values: the reference path only; the fused path folds
    this check into its row plan's one host read)."""
    for w in weights:
        if w is not None and w.numel() and not bool(torch.isfinite(w).all()):
            raise ValueError("sequence weights must be finite")


def node_rows(score_rows: torch.Tensor, score_branch_rows: torch.Tensor | None, num_nodes: int) -> torch.Tensor:
    """(M, N) rows of every trie node of each score: the root (``score_rows``) then the internal nodes in
    ``ScoreTrie.nodes`` order (``score_branch_rows`` (M, N - 1))."""
    if num_nodes == 1:
        return score_rows[:, None]
    if score_branch_rows is None or score_branch_rows.shape != (score_rows.shape[0], num_nodes - 1):
        got = None if score_branch_rows is None else tuple(score_branch_rows.shape)
        raise ValueError(f"a multi-token scale needs score_branch_rows of shape ({score_rows.shape[0]}, "
                         f"{num_nodes - 1}) (one row per internal trie node of each score), got {got}")
    return torch.cat([score_rows[:, None], score_branch_rows.to(score_rows.device, torch.long)], dim=1)


def nearest_value_index(score_targets: torch.Tensor, score_values: torch.Tensor) -> torch.Tensor:
    """Index of the score value nearest to each gold score (ties to the first, as :func:`nearest_score_token`)."""
    return (score_targets.double()[:, None] - score_values.double()[None, :]).abs().argmin(dim=1)


def effective_targets_multi(targets: torch.Tensor, rows: torch.Tensor, score_targets: torch.Tensor,
                            edge_ids: torch.Tensor, score_values: torch.Tensor, path_nodes: torch.Tensor,
                            path_edges: torch.Tensor, ce_on_score_token: bool) -> torch.Tensor:
    """Multi-token ``ce_on_score_token``: every node row on the nearest value's path gets that path's token
    (the value's tokens and, for a value that is a prefix of another, its terminator) as its CE target."""
    if not ce_on_score_token or rows.numel() == 0:
        return targets
    tgt = targets.clone()
    v = nearest_value_index(score_targets, score_values)
    pn, pe = path_nodes[v], path_edges[v]  # (M, L)
    valid = pn >= 0
    on_path = rows.gather(1, pn.clamp_min(0))
    tgt[on_path[valid]] = edge_ids[pe[valid]].to(tgt.dtype)
    return tgt


def value_logprobs(lp_nodes: torch.Tensor, incidence: torch.Tensor) -> torch.Tensor:
    """log p(v) (M, K) from the log-probabilities of the edge tokens at every node (M, N, K_u)."""
    return lp_nodes.reshape(lp_nodes.shape[0], -1) @ incidence.T
