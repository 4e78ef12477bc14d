"""Collectives that turn per-rank (vocab shard) row statistics into global ones.

Protocol, per token chunk (every rank holds the same hidden rows and a contiguous vocab shard):
  1. all-reduce MAX of the local row max m_r                       -> m
  2. rescale local sum-exp s_r * exp(m_r - m); all-reduce SUM of one packed buffer holding the
     rescaled sum-exp, the target logit (0 on ranks that do not own the target) and the score-token
     logits (0 where not owned)                                      -> s, z_target, z_score
After the loop the partial grad_hidden (dlogits_shard @ W_shard) is all-reduced (SUM) once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def shard_layout(local_rows: int, group: dist.ProcessGroup | None, device: torch.device) -> tuple[int, int, int]:
    """(vocab_start, global_vocab, max_local_rows) for contiguous, possibly uneven, shards by rank."""
    if group is None:
        return 0, local_rows, local_rows
    mine = torch.tensor([local_rows], dtype=torch.int64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    sizes = [int(p.item()) for p in parts]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes), max(sizes)


def combine_row_stats(
    m: torch.Tensor,
    s: torch.Tensor,
    z_target: torch.Tensor,
    z_score: torch.Tensor,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global (max, sum-exp, target logit, score logits) from the local ones; identity without a group."""
    if group is None:
        return m, s, z_target, z_score
    m_glob = m.clone()
    dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=group)
    scale = torch.exp(m - m_glob)  # m = -inf on an empty shard -> 0
    n = s.numel()
    packed = torch.cat([s * scale, z_target, z_score.reshape(-1)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return m_glob, packed[:n], packed[n : 2 * n], packed[2 * n :].view(z_score.shape)


def all_reduce_sum_(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
