"""Per-tile softmax statistics and dlogits: PyTorch versions plus dispatch to the Triton kernels.

The PyTorch versions define the semantics (and run on CPU); the Triton kernels in
``triton_kernels.py`` must agree with them (tested under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch

from . import triton_kernels


def use_triton(tile: torch.Tensor) -> bool:
    """Triton on CUDA for fp32/bf16/fp16 tiles; float64 and CPU use PyTorch.

    ``TRACT_LOSS_TRITON``: ``0`` forces PyTorch (debugging, A/B timing); ``force`` uses Triton for
    any non-fp64 tile, which on CPU needs ``TRITON_INTERPRET=1`` (used by the tests).
    """
    mode = os.environ.get("TRACT_LOSS_TRITON", "1")
    if not triton_kernels.HAS_TRITON or mode == "0" or tile.dtype == torch.float64:
        return False
    return tile.is_cuda or mode == "force"


def torch_tile_stats(tile: torch.Tensor, cdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max and sum-exp relative to it, in ``cdt``."""
    z = tile.to(cdt)
    m = z.amax(dim=1)
    s = (z - m[:, None]).exp_().sum(dim=1)  # one tile-sized temporary
    return m, s


def torch_tile_grad(
    tile: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    a: torch.Tensor,
    tgt_col: torch.Tensor,
    b: torch.Tensor,
    score_col: torch.Tensor,
    e: torch.Tensor,
) -> torch.Tensor:
    """dlogits = a * softmax - b * onehot(tgt_col) + sum_k e_k * onehot(score_col_k); -1 = absent."""
    cdt = lse.dtype
    g = tile.to(cdt, copy=True) if tile.dtype != cdt or out.data_ptr() != tile.data_ptr() else tile
    g.sub_(lse[:, None]).exp_().mul_(a[:, None])
    rows = torch.nonzero(tgt_col >= 0).squeeze(1)
    if rows.numel():
        g.index_put_((rows, tgt_col[rows]), -b[rows], accumulate=True)
    cols = torch.nonzero(score_col >= 0).squeeze(1)
    if cols.numel() and g.shape[0]:
        g[:, score_col[cols]] += e[:, cols].to(cdt)
    if g.data_ptr() != out.data_ptr():
        out.copy_(g)
    return out


def tile_stats(tile: torch.Tensor, cdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(tile):
        m, s = triton_kernels.triton_tile_stats(tile)
        return m.to(cdt), s.to(cdt)
    return torch_tile_stats(tile, cdt)


def tile_grad_(
    tile: torch.Tensor,
    lse: torch.Tensor,
    a: torch.Tensor,
    tgt_col: torch.Tensor,
    b: torch.Tensor,
    score_col: torch.Tensor,
    e: torch.Tensor,
) -> torch.Tensor:
    """Overwrite ``tile`` (logits, any float dtype) with dlogits in the same dtype and return it."""
    if use_triton(tile):
        return triton_kernels.triton_tile_grad(tile, tile, lse, a, tgt_col, b, score_col, e)
    return torch_tile_grad(tile, tile, lse, a, tgt_col, b, score_col, e)
