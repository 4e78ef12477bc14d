"""CoT-RAFT loss on a Hugging Face causal LM: hidden states -> active rows -> fused loss.

Batch contract (one micro-batch, all tensors on the model's device):

* ``input_ids`` (B, T) long, ``attention_mask`` (B, T) (optional).
* ``labels`` (B, T) long, aligned with ``input_ids`` as in Hugging Face (``labels[b, t]`` is the token
  at ``t``; -100 = ``protocol.IGNORE_INDEX``: not trained). This module shifts them: the row at
  position ``t`` predicts ``labels[b, t + 1]``.
* ``score_positions`` (B,) long: the position whose *next* token is the score token, i.e. the row
  that predicts the score (-1 = no score in this example).
* ``score_targets`` (B,) float: the gold score of each example (ignored where the position is -1).
* ``ce_weights`` / ``mse_weights`` (B,) float, optional: a real weight per sequence on its CE tokens / on
  its squared error (stage-2 selection weights, a policy-gradient advantage); absent: 1. They reach the loss
  as one weight per loss row (:func:`select_loss_rows`), which is all a packed layout needs to provide too.
* ``score_branch_positions`` (B, E) long, optional: a multi-token scale's trie-node tokens (``data.encode``,
  padded layout with the (B, 1, T, T) tree ``attention_mask`` and ``position_ids`` of ``train.data.collate``);
  their rows reach the loss as ``score_branch_rows``.
* ``ce_token_weights`` (B, T) float, optional: a weight per label token (aligned with ``labels``), multiplied
  into the sequence's CE weight: REAL's clipped importance ratios and KL gradient are per-token weights
  (:mod:`tract_dist.real.objective`).

A *packed* micro-batch (:func:`tract_dist.train.batching.collate_packed`) is one row (B = 1) of several whole
examples: ``position_ids`` (1, T) restart at 0 for each (transformers then keeps attention inside each example),
``cu_seq_lens`` (S + 1,) their start offsets (flash-attention's varlen kernel and the per-example sdpa of
:mod:`.packed_attention` run each example alone), ``sequence_index`` (1, T) names each token's example, no
``attention_mask``, and ``score_positions`` /
``score_targets`` have one entry per example (S,), positions within the row. With B = 1 the two layouts agree,
so the rule is: B > 1 needs one score position per row; B = 1 takes any number. No target is taken across a
change of ``sequence_index``.

The score row's own label is masked out of the CE here; whether the score token is trained with CE
as well is the loss's ``ce_on_score_token`` switch, so the decision lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from tract_dist.loss.options import CoTRaftLossOptions
from tract_dist.protocol import IGNORE_INDEX

from .hidden import final_hidden_states, lm_head_parameters, unwrap_causal_lm
from .zero3 import is_zero3_param, register_external_params

Denominator = float | int | torch.Tensor | None
LossFn = Callable[..., Any]


@dataclass(frozen=True)
class LossRows:
    """Which flattened (b * T + t) hidden rows the loss needs, and their targets."""

    row_index: torch.Tensor  # (N,) long, into the flattened (B*T) rows
    targets: torch.Tensor  # (N,) long, next-token targets, -100 where only the score is trained
    score_rows: torch.Tensor  # (M,) long, into row_index
    score_targets: torch.Tensor  # (M,) float
    ce_weights: torch.Tensor | None = None  # (N,) the weight of each kept row's sequence on its CE term
    mse_weights: torch.Tensor | None = None  # (M,) the weight of each score row's sequence on its squared error
    score_branch_rows: torch.Tensor | None = None  # (M, E) multi-token scales: the trie-node rows, into row_index


def select_loss_rows(labels: torch.Tensor, score_positions: torch.Tensor, score_targets: torch.Tensor,
                     sequence_index: torch.Tensor | None = None, ce_weights: torch.Tensor | None = None,
                     mse_weights: torch.Tensor | None = None, ce_token_weights: torch.Tensor | None = None,
                     score_branch_positions: torch.Tensor | None = None) -> LossRows:
    """Shift the labels and keep only rows with a CE target or a score, so the loss sees N << B*T rows.

    ``sequence_index`` (packed rows): a row whose next token belongs to another example gets no target.
    ``ce_weights`` / ``mse_weights`` (S,), one per example (per row when B > 1): gathered here to one per kept
    row (its example: ``sequence_index`` when packed, else r // T) and one per score row. ``ce_token_weights``
    (B, T): one weight per label token (aligned with ``labels``, shifted here with them), multiplied into the CE
    weight of its row. ``score_branch_positions`` (B, E): a multi-token scale's trie-node tokens (padded layout),
    whose rows the loss reads beside the score row; they are kept and get no CE target."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, T), got {tuple(labels.shape)}")
    batch, seq = labels.shape
    if score_positions.dim() != 1 or score_targets.shape != score_positions.shape:
        raise ValueError("score_positions and score_targets must have the same shape (S,)")
    if batch > 1 and score_positions.shape[0] != batch:
        raise ValueError("score_positions and score_targets must have shape (B,) when B > 1 (one per row; a packed "
                         "row of several examples has B = 1)")
    for name, w in (("ce_weights", ce_weights), ("mse_weights", mse_weights)):
        if w is not None and w.shape != score_positions.shape:
            raise ValueError(f"{name} must have shape {tuple(score_positions.shape)}, one weight per example")
    if ce_token_weights is not None and ce_token_weights.shape != labels.shape:
        raise ValueError(f"ce_token_weights must have the shape of labels {tuple(labels.shape)}")
    has_score = score_positions >= 0
    if bool((score_positions[has_score] >= seq).any()):
        raise ValueError(f"score_positions must be < T={seq}")

    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    if sequence_index is not None:
        if sequence_index.shape != labels.shape:
            raise ValueError("sequence_index must have the shape of labels (B, T)")
        crossing = sequence_index[:, 1:] != sequence_index[:, :-1]
        shifted[:, :-1] = shifted[:, :-1].masked_fill(crossing, IGNORE_INDEX)
    row_of = (torch.arange(batch, device=labels.device) if batch > 1
              else torch.zeros(score_positions.shape[0], dtype=torch.long, device=labels.device))
    score_flat = row_of[has_score] * seq + score_positions[has_score]
    shifted = shifted.flatten()
    shifted[score_flat] = IGNORE_INDEX  # CE on the score token is the loss's decision (ce_on_score_token)
    branch_flat = None
    if score_branch_positions is not None:
        if batch == 1 and score_positions.shape[0] > 1 or score_branch_positions.shape[0] != score_positions.shape[0]:
            raise ValueError("score_branch_positions needs the padded layout, one row of (E,) positions per example")
        branch_flat = (row_of[:, None] * seq + score_branch_positions)[has_score]
        shifted[branch_flat.flatten()] = IGNORE_INDEX

    keep = shifted != IGNORE_INDEX
    keep[score_flat] = True
    if branch_flat is not None:
        keep[branch_flat.flatten()] = True
    row_index = keep.nonzero().squeeze(1)
    compact = torch.cumsum(keep.long(), 0) - 1  # flattened row -> position among kept rows
    row_w = None if ce_weights is None else ce_weights[
        sequence_index.flatten()[row_index] if sequence_index is not None
        else torch.div(row_index, seq, rounding_mode="floor")]
    if ce_token_weights is not None:
        tw = torch.zeros_like(ce_token_weights)
        tw[:, :-1] = ce_token_weights[:, 1:]  # the row at t predicts the label at t + 1
        tw = tw.flatten()[row_index]
        row_w = tw if row_w is None else row_w * tw.to(row_w.dtype)
    return LossRows(
        row_index=row_index,
        targets=shifted[row_index],
        score_rows=compact[score_flat],
        score_targets=score_targets[has_score],
        ce_weights=row_w,
        mse_weights=None if mse_weights is None else mse_weights[has_score],
        score_branch_rows=None if branch_flat is None else compact[branch_flat],
    )


def _default_loss_fn() -> LossFn:
    from tract_dist.loss import cot_raft_loss_with_options  # late: importing the kernels costs start-up time

    return cot_raft_loss_with_options


class CotRaftOutput(NamedTuple):
    """The loss output as a NamedTuple: DeepSpeed's module hooks and engine see its tensors."""

    loss: torch.Tensor  # differentiable: ce + lam * mse
    ce: torch.Tensor
    mse: torch.Tensor
    yhat: torch.Tensor  # (M,) expected score of each score row
    n_ce_tokens: int
    n_score_rows: int


class CotRaftHead(nn.Module):
    """The CoT-RAFT loss as a module over the lm_head weight, without owning it.

    It exists for ZeRO-3: the lm_head weight/bias are registered as its external parameters, so
    DeepSpeed gathers them around this module's forward and backward (see :mod:`.zero3`). Hold it
    as a submodule of the model given to DeepSpeed's ``initialize`` (as :class:`CotRaftCausalLM` does).
    Build it after any vocabulary resize: it keeps the Parameter objects it was given. ``loss_fn``
    (default :func:`tract_dist.loss.cot_raft_loss_with_options`) has that function's signature.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        options: CoTRaftLossOptions,
        *,
        loss_fn: LossFn | None = None,
        zero3: bool = True,
    ) -> None:
        super().__init__()
        self.head_params = (weight, bias)  # a tuple: not registered, the causal LM owns them
        self.options = options
        self.loss_fn = loss_fn
        if zero3:
            register_external_params(self, self.head_params)

    def forward(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        score_rows: torch.Tensor,
        score_targets: torch.Tensor,
        ce_denominator: Denominator = None,
        mse_denominator: Denominator = None,
        ce_weights: torch.Tensor | None = None,
        mse_weights: torch.Tensor | None = None,
        lam: float | None = None,
        token_logprobs: bool = False,
        score_branch_rows: torch.Tensor | None = None,
    ) -> CotRaftOutput | torch.Tensor:
        """Loss of (N, H) ``hidden`` rows. ``score_branch_rows`` (M, E): a multi-token scale's trie-node rows. ``hidden`` is positional on purpose: ZeRO-3's post-backward
        hook, which releases the gathered weight, is attached to positional inputs only. ``ce_weights`` (N,)
        / ``mse_weights`` (M,): per-row weights; ``lam``: this step's λ (None: the options').
        ``token_logprobs``: return instead the float32 log-probability of each row's target (N,) (0 where the
        target is ignored), without gradient, in row chunks (never N x V logits at once): what REAL's
        importance ratios and KL weights are computed from, inside the forward where ZeRO-3 gathered the head."""
        weight, bias = self.head_params
        if is_zero3_param(weight) and weight.data.numel() == 0:
            raise RuntimeError(
                "lm_head weight is partitioned inside CotRaftHead.forward: the head must be a submodule of "
                "the model passed to DeepSpeed's initialize (e.g. use CotRaftCausalLM)"
            )
        if token_logprobs:
            return rows_target_logprobs(hidden, weight, bias, targets)
        real = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # float64 runs stay exact
        fn = self.loss_fn if self.loss_fn is not None else _default_loss_fn()
        out = fn(
            hidden,
            weight,
            targets,
            score_rows,
            score_targets.to(device=hidden.device, dtype=real),
            self.options,
            bias=bias,
            ce_denominator=ce_denominator,
            mse_denominator=mse_denominator,
            **_optional(ce_weights=_real(ce_weights, hidden.device, real),
                        mse_weights=_real(mse_weights, hidden.device, real), lam=lam,
                        score_branch_rows=score_branch_rows),
        )
        return CotRaftOutput(out.loss, out.ce, out.mse, out.yhat, int(out.n_ce_tokens), int(out.n_score_rows))


LOGPROB_CHUNK_ROWS = 512
"""Rows per logits chunk of :func:`rows_target_logprobs`: 512 x a 152k vocabulary in fp32 is 311 MB."""


@torch.no_grad()
def rows_target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias)[target] per row in float32 (float64 for float64 inputs); 0 where
    the target is ignored."""
    real = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = torch.zeros(hidden.shape[0], dtype=real, device=hidden.device)
    live = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    for i in range(0, live.numel(), LOGPROB_CHUNK_ROWS):
        idx = live[i:i + LOGPROB_CHUNK_ROWS]
        logits = (hidden.index_select(0, idx) @ weight.T).to(real)
        if bias is not None:
            logits = logits + bias.to(real)
        out[idx] = torch.log_softmax(logits, -1).gather(1, targets[idx].unsqueeze(1)).squeeze(1)
    return out


def _real(w: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    return None if w is None else w.to(device=device, dtype=dtype)


def _optional(**kw: Any) -> dict[str, Any]:
    """Keyword arguments that are set: a custom ``loss_fn`` without weight or λ arguments keeps working
    for unweighted batches."""
    return {k: v for k, v in kw.items() if v is not None}


def _loss_through_head(
    lm: nn.Module,
    head: CotRaftHead,
    batch: Mapping[str, torch.Tensor | None],
    ce_denominator: Denominator,
    mse_denominator: Denominator,
    lam: float | None = None,
    token_logprobs: bool = False,
) -> CotRaftOutput | torch.Tensor:
    hidden = final_hidden_states(lm, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"),
                                 batch.get("cu_seq_lens"))
    rows = select_loss_rows(batch["labels"], batch["score_positions"], batch["score_targets"],
                            batch.get("sequence_index"), batch.get("ce_weights"), batch.get("mse_weights"),
                            batch.get("ce_token_weights"), batch.get("score_branch_positions"))
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.row_index)
    if token_logprobs:  # (B, T) aligned with labels: the log-prob of labels[b, t] (0 where not trained)
        per_row = head(flat, rows.targets, rows.score_rows, rows.score_targets, token_logprobs=True)
        labels = batch["labels"]
        out = torch.zeros(labels.numel(), dtype=per_row.dtype, device=per_row.device)
        out[rows.row_index] = per_row  # at the predicting row t ...
        out = out.view(labels.shape)
        aligned = torch.zeros_like(out)
        aligned[:, 1:] = out[:, :-1]  # ... moved to the label's own position t + 1
        return aligned
    return head(flat, rows.targets, rows.score_rows, rows.score_targets, ce_denominator, mse_denominator,
                **_optional(ce_weights=rows.ce_weights, mse_weights=rows.mse_weights, lam=lam,
                            score_branch_rows=rows.score_branch_rows))


def causal_lm_cot_raft_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor | None],
    options: CoTRaftLossOptions,
    *,
    ce_denominator: Denominator = None,
    mse_denominator: Denominator = None,
    loss_fn: LossFn | None = None,
    lam: float | None = None,
) -> CotRaftOutput:
    """CoT-RAFT loss of ``model`` (HF causal LM or PEFT-wrapped) on ``batch``, never forming (B, T, V) logits.

    For plain PyTorch and PEFT models; under DeepSpeed ZeRO-3 use :class:`CotRaftCausalLM` as the
    engine's module (its loss head is hooked by ZeRO-3). ``ce_denominator`` / ``mse_denominator``
    default to this call's counts; pass global counts for gradient accumulation or data parallelism
    (DeepSpeed averages gradients over ranks, so there pass ``global_count / world_size``).
    """
    lm = unwrap_causal_lm(model)
    weight, bias = lm_head_parameters(lm)
    if is_zero3_param(weight):
        raise RuntimeError(
            "lm_head is a ZeRO-3 parameter: wrap the model in CotRaftCausalLM before DeepSpeed's initialize"
        )
    head = CotRaftHead(weight, bias, options, loss_fn=loss_fn, zero3=False)
    return _loss_through_head(lm, head, batch, ce_denominator, mse_denominator, lam)


class CotRaftCausalLM(nn.Module):
    """A causal LM whose ``forward(**batch)`` returns the CoT-RAFT loss (:class:`CotRaftOutput`).

    The module to hand to DeepSpeed's ``initialize`` (build it before, so ZeRO-3 hooks its loss head):
    the decoder's submodule hooks gather and release the layers, the :class:`CotRaftHead` hooks the
    lm_head weight, and the root hooks (ZeRO-3 step reset, parameter trace) run on every
    ``engine(**batch)``. Loss settings are fixed at construction; the denominators, which change per
    step, are forward arguments (the loss settings come as one :class:`CoTRaftLossOptions`). Works
    unchanged without DeepSpeed and with PEFT models.
    """

    def __init__(self, model: nn.Module, options: CoTRaftLossOptions, *, loss_fn: LossFn | None = None) -> None:
        super().__init__()
        weight, bias = lm_head_parameters(model)  # fails here, not at the first step, if unsupported
        self.lm = model
        self.head = CotRaftHead(weight, bias, options, loss_fn=loss_fn)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        score_positions: torch.Tensor,
        score_targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        ce_denominator: Denominator = None,
        mse_denominator: Denominator = None,
        ce_weights: torch.Tensor | None = None,
        mse_weights: torch.Tensor | None = None,
        lam: float | None = None,
        position_ids: torch.Tensor | None = None,
        sequence_index: torch.Tensor | None = None,
        cu_seq_lens: torch.Tensor | None = None,
        ce_token_weights: torch.Tensor | None = None,
        token_logprobs: bool = False,
        score_branch_positions: torch.Tensor | None = None,
    ) -> CotRaftOutput | torch.Tensor:
        """The loss (:class:`CotRaftOutput`); with ``token_logprobs`` instead the (B, T) log-probability of
        every trained label token (no gradient)."""
        # No ``self.lm.lm_head.weight`` here: under a ZeRO-3 engine, reading a partitioned parameter
        # through its module during forward makes DeepSpeed gather it and register it as external to
        # the module running (this root), keeping the full lm_head for the whole forward.
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "score_positions": score_positions,
            "score_targets": score_targets,
            "ce_weights": ce_weights,
            "mse_weights": mse_weights,
            "position_ids": position_ids,
            "sequence_index": sequence_index,
            "cu_seq_lens": cu_seq_lens,
            "ce_token_weights": ce_token_weights,
            "score_branch_positions": score_branch_positions,
        }
        return _loss_through_head(self.lm, self.head, batch, ce_denominator, mse_denominator, lam, token_logprobs)
