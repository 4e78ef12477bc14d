"""Ignored (prompt) rows cost no matmul FLOPs in the fused path: FLOPs scale with active rows, not N."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tract_dist.loss import cot_raft_loss


class MatmulFlops(TorchDispatchMode):
    """Counts 2*m*n*k for every mm/addmm, ``out=`` and in-place ``addmm_`` included (FlopCounterMode skips them)."""

    OPS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.mm.out: (0, 1), torch.ops.aten.addmm.default: (1, 2),
           torch.ops.aten.addmm.out: (1, 2), torch.ops.aten.addmm_.default: (1, 2)}

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            i, j = self.OPS[func]
            (m, k), (_, n) = args[i].shape, args[j].shape
            self.flops += 2 * m * n * k
        return func(*args, **(kwargs or {}))


def _fused_flops(n_rows: int, n_active: int, h: int = 16, v: int = 500) -> int:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n_rows, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.full((n_rows,), -100)
    targets[n_rows - n_active : n_rows - 1] = torch.randint(0, v, (n_active - 1,), generator=g)
    score_rows = torch.tensor([n_rows - 1])  # the last active row
    counter = MatmulFlops()
    with counter:
        out = cot_raft_loss(hidden, weight, targets, score_rows, torch.tensor([2.5]), torch.arange(5), torch.arange(1.0, 6.0))
        torch.autograd.grad(out.loss, [hidden, weight])
    return counter.flops


def test_flops_follow_active_rows_not_batch_size():
    h, v, active = 16, 500, 40
    small = _fused_flops(50, active)
    large = _fused_flops(1000, active)  # 20x more rows, same active rows
    assert small == large
    # Single vocab shard: logits, dl @ W, dl^T @ h -> 3 matmuls of 2 * A * V * H FLOPs (+ tiny score terms).
    assert 3 * 2 * active * v * h <= large <= 1.01 * 3 * 2 * active * v * h + 1000
