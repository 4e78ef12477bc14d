"""CoT-RAFT loss on a Hugging Face causal LM: hidden states -> active rows -> fused loss.

Batch contract (one micro-batch, all tensors on the model's device):

* ``input_ids`` (B, T) long, ``attention_mask`` (B, T) (optional).
* ``labels`` (B, T) long, aligned with ``input_ids`` as in Hugging Face (``labels[b, t]`` is the token
  at ``t``; -100 = not trained). This module shifts them: the row at position ``t`` predicts
  ``labels[b, t + 1]``.
* ``score_positions`` (B,) long: the position whose *next* token is the score token, i.e. the row
  that predicts the score (-1 = no score in this example).
* ``score_targets`` (B,) float: the gold score of each example (ignored where the position is -1).

The score row's own label is masked out of the CE here; whether the score token is trained with CE
as well is the loss's ``ce_on_score_token`` switch, so the decision lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .hidden import final_hidden_states, lm_head_parameters, unwrap_causal_lm
from .zero3 import gathered_for_loss

IGNORE_INDEX = -100
Denominator = float | int | torch.Tensor | None
LossFn = Callable[..., Any]


@dataclass(frozen=True)
class LossRows:
    """Which flattened (b * T + t) hidden rows the loss needs, and their targets."""

    row_index: torch.Tensor  # (N,) long, into the flattened (B*T) rows
    targets: torch.Tensor  # (N,) long, next-token targets, -100 where only the score is trained
    score_rows: torch.Tensor  # (M,) long, into row_index
    score_targets: torch.Tensor  # (M,) float


def select_loss_rows(labels: torch.Tensor, score_positions: torch.Tensor, score_targets: torch.Tensor) -> LossRows:
    """Shift the labels and keep only rows with a CE target or a score, so the loss sees N << B*T rows."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, T), got {tuple(labels.shape)}")
    batch, seq = labels.shape
    if score_positions.shape != (batch,) or score_targets.shape != (batch,):
        raise ValueError("score_positions and score_targets must have shape (B,)")
    has_score = score_positions >= 0
    if bool((score_positions[has_score] >= seq).any()):
        raise ValueError(f"score_positions must be < T={seq}")

    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    score_flat = torch.arange(batch, device=labels.device)[has_score] * seq + score_positions[has_score]
    shifted = shifted.flatten()
    shifted[score_flat] = IGNORE_INDEX  # CE on the score token is the loss's decision (ce_on_score_token)

    keep = shifted != IGNORE_INDEX
    keep[score_flat] = True
    row_index = keep.nonzero().squeeze(1)
    compact = torch.cumsum(keep.long(), 0) - 1  # flattened row -> position among kept rows
    return LossRows(
        row_index=row_index,
        targets=shifted[row_index],
        score_rows=compact[score_flat],
        score_targets=score_targets[has_score],
    )


def _default_loss_fn() -> LossFn:
    from tract_dist.loss import cot_raft_loss  # imported late: the loss package is optional for tiny tools

    return cot_raft_loss


def causal_lm_cot_raft_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    score_token_ids: Sequence[int] | torch.Tensor,
    score_values: Sequence[float] | torch.Tensor,
    lam: float = 1.0,
    rail_normalize: bool = False,
    ce_on_score_token: bool = False,
    ce_denominator: Denominator = None,
    mse_denominator: Denominator = None,
    impl: str = "fused",
    chunk_size: int | None = None,
    loss_fn: LossFn | None = None,
) -> Any:
    """CoT-RAFT loss of ``model`` (HF causal LM or PEFT-wrapped) on ``batch``, never forming (B, T, V) logits.

    ``ce_denominator`` / ``mse_denominator`` default to this call's counts; pass global counts for
    gradient accumulation or data parallelism (under DeepSpeed, which averages gradients over ranks,
    pass ``global_count / world_size``). Returns the loss function's output (``.loss``, ``.ce``,
    ``.mse``, ``.yhat``). Under ZeRO-3 every rank must call it (the lm_head gather is a collective).
    ``chunk_size`` (fused tile rows) is passed on only when set. ``loss_fn`` defaults to
    :func:`tract_dist.loss.cot_raft_loss`.
    """
    lm = unwrap_causal_lm(model)
    hidden = final_hidden_states(lm, batch["input_ids"], batch.get("attention_mask"))
    rows = select_loss_rows(batch["labels"], batch["score_positions"], batch["score_targets"])
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.row_index)

    device = flat.device
    real = torch.float64 if flat.dtype == torch.float64 else torch.float32  # float64 runs stay exact
    token_ids = torch.as_tensor(score_token_ids, dtype=torch.long, device=device)
    values = torch.as_tensor(score_values, dtype=real, device=device)
    fn = loss_fn if loss_fn is not None else _default_loss_fn()
    extra = {} if chunk_size is None else {"chunk_size": chunk_size}
    weight, bias = lm_head_parameters(lm)
    with gathered_for_loss([weight, bias], keep_for_backward=impl != "fused") as (w, b):
        return fn(
            flat,
            w,
            rows.targets,
            rows.score_rows,
            rows.score_targets.to(device=device, dtype=real),
            token_ids,
            values,
            bias=b,
            lam=lam,
            rail_normalize=rail_normalize,
            ce_on_score_token=ce_on_score_token,
            ce_denominator=ce_denominator,
            mse_denominator=mse_denominator,
            impl=impl,
            **extra,
        )


class CotRaftCausalLM(nn.Module):
    """A causal LM whose ``forward(**batch)`` returns the CoT-RAFT loss output.

    This is the module to hand to ``deepspeed.initialize``: the engine's root-module hooks (ZeRO-3
    step reset, parameter trace) then run on every ``engine(**batch)``, while the decoder's own
    submodule hooks gather and release the layers. The loss settings are fixed at construction; the
    denominators, which change per step, are forward arguments.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        score_token_ids: Sequence[int],
        score_values: Sequence[float],
        lam: float = 1.0,
        rail_normalize: bool = False,
        ce_on_score_token: bool = False,
        impl: str = "fused",
        chunk_size: int | None = None,
        loss_fn: LossFn | None = None,
    ) -> None:
        super().__init__()
        unwrap_causal_lm(model)  # fail at construction, not at the first step
        self.lm = model
        self.score_token_ids = [int(t) for t in score_token_ids]
        self.score_values = [float(v) for v in score_values]
        self.lam = lam
        self.rail_normalize = rail_normalize
        self.ce_on_score_token = ce_on_score_token
        self.impl = impl
        self.chunk_size = chunk_size
        self.loss_fn = loss_fn

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        score_positions: torch.Tensor,
        score_targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        ce_denominator: Denominator = None,
        mse_denominator: Denominator = None,
    ) -> Any:
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "score_positions": score_positions,
            "score_targets": score_targets,
        }
        return causal_lm_cot_raft_loss(
            self.lm,
            batch,
            score_token_ids=self.score_token_ids,
            score_values=self.score_values,
            lam=self.lam,
            rail_normalize=self.rail_normalize,
            ce_on_score_token=self.ce_on_score_token,
            ce_denominator=ce_denominator,
            mse_denominator=mse_denominator,
            impl=self.impl,
            chunk_size=self.chunk_size,
            loss_fn=self.loss_fn,
        )
