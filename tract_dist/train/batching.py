"""How one optimizer step's samples become each worker's micro-batches: padded, length-grouped or packed.

Every worker computes the layout of *all* workers from the step's sample indices and the encoded lengths, with
no communication, so every rank runs the same number of forward passes (ZeRO-3 gathers the parameters in each
one, and reduce-scatters the gradients in each backward). The layout never changes what a step computes: the
loss is divided by the counts of the whole step (:func:`tract_dist.train.data.loss_denominators`), so any
assignment of its samples to workers and micro-batches gives the gradient of one big batch.

- **padded** (the default): ``micro_batch_size`` samples per micro-batch, right-padded to the longest;
  ``group_by_length`` sorts the step's samples by length first, so samples of similar length share a micro-batch
  (less padding), and the workers' micro-batches of one forward are the adjacent ones (a forward lasts as long
  as its largest micro-batch, so the long samples cost one forward instead of several).
- **packed** (``training.packing``): each micro-batch is one row of whole examples, at most
  ``max_tokens_per_micro_batch`` tokens, no padding; position ids restart at 0 for every example and attention
  stays inside each example (flash-attention's variable-length kernel; with sdpa one causal call per example,
  :mod:`tract_dist.models.packed_attention`; transformers' block-diagonal mask with eager; :func:`collate_packed`).
  The step's samples are spread over ``world x k`` rows with the longest-processing-time-first rule (each sample
  into the least-filled row), ``k`` the fewest rows per worker that fit the budget, so rows and workers carry
  similar token counts.

A worker left without a sample for one micro-batch (a step with fewer samples than rows, e.g. after resuming on
more workers) runs a *filler*: the step's first sample with its loss multiplied by 0, so its collectives still
happen and nothing is counted (:class:`MicroBatch`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from tract_dist.protocol import IGNORE_INDEX


@dataclass(frozen=True)
class MicroBatch:
    """The sample indices of one micro-batch of one worker; ``filler``: none of its own (weight 0)."""

    indices: tuple[int, ...]
    filler: bool = False


@dataclass(frozen=True)
class BatchLayout:
    """How a step's samples are split over workers and micro-batches (see the module docstring)."""

    world_size: int
    micro_batch_size: int
    packing: bool = False
    max_tokens: int | None = None
    group_by_length: bool = False

    def __post_init__(self) -> None:
        if self.packing and not self.max_tokens:
            raise ValueError("packing needs a token budget per micro-batch (max_tokens)")

    def split(self, indices: Sequence[int], lengths: Sequence[int]) -> list[list[list[int]]]:
        """``[micro][rank]`` -> sample indices of the step whose samples are ``indices``; ``lengths[i]`` is
        sample i's token count. Every rank gets the same number of micro-batches; a list may be empty."""
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("a step without samples")
        if self.packing:
            return pack_step(idx, lengths, self.world_size, int(self.max_tokens or 0))
        return split_padded(idx, lengths, self.world_size, self.micro_batch_size, self.group_by_length)

    def rank_batches(self, indices: Sequence[int], lengths: Sequence[int], rank: int) -> list[MicroBatch]:
        """This rank's micro-batches of the step, fillers included (see :class:`MicroBatch`)."""
        first = (int(indices[0]),)
        return [MicroBatch(tuple(m[rank])) if m[rank] else MicroBatch(first, filler=True)
                for m in self.split(indices, lengths)]


def split_padded(indices: list[int], lengths: Sequence[int], world: int, micro: int,
                 group_by_length: bool = False) -> list[list[list[int]]]:
    """Slots of at most ``micro`` samples laid out ``[micro][rank]`` in the step's order (sorted longest first
    with ``group_by_length``), sizes as even as possible. With ``len(indices) == micro x accum x world`` this is
    slot ``m x world + r`` = the ``micro`` samples from position ``(m x world + r) x micro``: the layout of
    every earlier version, so their checkpoints resume at the same data position."""
    if group_by_length:
        indices = sorted(indices, key=lambda i: -int(lengths[i]))  # stable: ties keep the step's order
    n = len(indices)
    n_micro = max(1, math.ceil(n / (world * micro)))
    slots = world * n_micro
    q, r = divmod(n, slots)
    out: list[list[list[int]]] = [[[] for _ in range(world)] for _ in range(n_micro)]
    pos = 0
    for k in range(slots):
        size = q + (1 if k < r else 0)
        m, rank = divmod(k, world)
        out[m][rank] = indices[pos:pos + size]
        pos += size
    return out


def pack_step(indices: list[int], lengths: Sequence[int], world: int, budget: int) -> list[list[list[int]]]:
    """Rows of at most ``budget`` tokens laid out ``[micro][rank]``: ``world x k`` rows, ``k`` the fewest per
    rank that fit, filled longest-first into the least-filled row (LPT); rows sorted by tokens so that the
    ``world`` rows of one forward are of similar size."""
    sizes = [int(lengths[i]) for i in indices]
    if max(sizes) > budget:
        raise ValueError(f"a sample of {max(sizes)} tokens does not fit a packed row of {budget} tokens: raise "
                         "training.max_tokens_per_micro_batch to at least data.max_length")
    k = max(1, math.ceil(sum(sizes) / (world * budget)))
    while (rows := _lpt(indices, sizes, world * k, budget)) is None:
        k += 1
    rows.sort(key=lambda row: -sum(int(lengths[i]) for i in row))
    return [[rows[m * world + r] for r in range(world)] for m in range(k)]


def _lpt(indices: list[int], sizes: list[int], n_rows: int, budget: int) -> list[list[int]] | None:
    """Longest processing time first: each sample (longest first) into the row with the fewest tokens; None
    when one does not fit there (then it fits nowhere: more rows are needed)."""
    heap = [(0, r) for r in range(n_rows)]
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    for pos in sorted(range(len(indices)), key=lambda p: (-sizes[p], p)):
        load, r = heapq.heappop(heap)
        if load + sizes[pos] > budget:
            return None
        rows[r].append(indices[pos])
        heapq.heappush(heap, (load + sizes[pos], r))
    return rows


def collate_packed(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Concatenate whole examples into one row (batch 1, no padding, no attention mask).

    ``position_ids`` restart at 0 for every example: transformers reads that as packed sequences (block-diagonal
    causal mask with sdpa / eager), so no token attends across examples; with ``cu_seq_lens`` flash-attention's
    varlen kernel and the per-example sdpa run each example alone.
    ``sequence_index`` (1, T) says which example (index into ``score_targets``) each token belongs to: the loss
    never predicts across a boundary, and per-sequence attributes (weights) can be mapped to tokens.
    ``score_positions`` (S,) are positions in the row (one per example); ``cu_seq_lens`` (S + 1,) the examples'
    start offsets and the row's length (flash-attention's varlen arguments; the per-example sdpa's bounds)."""
    if rows and rows[0].get("branch_positions"):
        raise ValueError("training.packing does not support multi-token score scales (their trie-node tokens need a "
                         "tree attention mask); set training.packing=false or a scale of single-token values")
    ids, labels, pos, seq, score_pos, bounds = [], [], [], [], [], [0]
    start = 0
    for s, r in enumerate(rows):
        t = len(r["input_ids"])
        ids += r["input_ids"]
        lab = list(r["labels"])
        lab[0] = IGNORE_INDEX  # never a target from the previous example's last token (it is a prompt token anyway)
        labels += lab
        pos += range(t)
        seq += [s] * t
        score_pos.append(start + r["score_position"] if r["score_position"] >= 0 else -1)
        start += t
        bounds.append(start)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "sequence_index": torch.tensor([seq], dtype=torch.long),
        "score_positions": torch.tensor(score_pos, dtype=torch.long),
        "score_targets": torch.tensor([r["score"] for r in rows], dtype=torch.float32),
        "cu_seq_lens": torch.tensor(bounds, dtype=torch.long),
        **_weights(rows),
    }


def _weights(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``ce_weights`` / ``mse_weights`` (S,) of a weighted data set's examples, as :func:`..data.collate` gives
    them (float64 on the host, rounded once by the loss); nothing for an unweighted one."""
    if rows[0].get("weight") is None:
        return {}
    weights = torch.tensor([float(r["weight"]) for r in rows], dtype=torch.float64)
    return {"ce_weights": weights, "mse_weights": weights.clone()}


def batch_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Real (non-pad) tokens of a padded or packed micro-batch, as a device scalar."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 4:  # a tree mask (train.data.tree_batch): every real token sees token 0,
        return mask[:, 0, :, 0].sum()  # padding (right-padded, never at 0) only itself
    if mask is not None:
        return mask.sum()
    return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)
