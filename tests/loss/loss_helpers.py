"""Problem builders and comparison helpers shared by the loss tests (also imported by subprocesses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tract_dist.loss import cot_raft_loss


@dataclass
class Problem:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    score_rows: torch.Tensor
    score_targets: torch.Tensor
    score_token_ids: torch.Tensor
    score_values: torch.Tensor

    def leaves(self) -> list[torch.Tensor]:
        return [t for t in (self.hidden, self.weight, self.bias) if t is not None]

    def args(self) -> tuple:
        return (
            self.hidden, self.weight, self.targets, self.score_rows, self.score_targets,
            self.score_token_ids, self.score_values,
        )


def make_problem(
    n: int = 37,
    h: int = 11,
    v: int = 53,
    *,
    dtype: torch.dtype = torch.float64,
    n_scale: int = 5,
    score_rows: list[int] | None = None,
    score_ids: list[int] | None = None,
    ignore_frac: float = 0.5,
    bias: bool = True,
    scale: float = 1.0,
    seed: int = 0,
) -> Problem:
    """Random problem; score rows get -100 targets (the caller's convention) and non-integer gold scores."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = -100
    if score_rows is None:
        score_rows = sorted(torch.randperm(n, generator=g)[: max(1, n // 8)].tolist())
    rows = torch.tensor(score_rows, dtype=torch.long)
    targets[rows] = -100
    if score_ids is None:
        score_ids = torch.randperm(v, generator=g)[:n_scale].tolist()
    ids = torch.tensor(score_ids, dtype=torch.long)
    values = torch.arange(1, ids.numel() + 1, dtype=torch.float64)
    y = (torch.rand(rows.numel(), generator=g, dtype=torch.float64) * (ids.numel() - 1) + 1).to(
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    return Problem(hidden, weight, b, targets, rows, y, ids, values.to(y.dtype))


def run(p: Problem, impl: str, **kw):
    """(output, grads of loss w.r.t. hidden, weight[, bias])."""
    out = cot_raft_loss(*p.args(), bias=p.bias, impl=impl, **kw)
    grads = torch.autograd.grad(out.loss, p.leaves(), allow_unused=False)
    return out, grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (elementwise-relative is meaningless for entries near 0)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.abs().max().clamp_min(1e-30)
    return float((a - b).abs().max() / denom)
