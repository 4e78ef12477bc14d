"""Per-tile softmax statistics and dlogits: PyTorch versions plus dispatch to the Triton kernels.

The PyTorch versions define the semantics (and run on CPU); the Triton kernels in
``triton_kernels.py`` must agree with them (tested under ``TRITON_INTERPRET=1``). The PyTorch versions
work in contiguous row blocks (``tiling.block_rows``): the fp32 temporaries stay cache-sized on CPU
and bounded on CUDA instead of doubling (bf16 tile) the tile's memory.
"""

from __future__ import annotations

import os

import torch

from . import triton_kernels
from .tiling import block_rows


def use_triton(tile: torch.Tensor, kernel: str = "auto") -> bool:
    """Whether the Triton kernels handle this tile.

    ``kernel="torch"``: never. ``"triton"``: always (CPU tiles need ``TRITON_INTERPRET=1``). ``"auto"``:
    on CUDA for fp32/bf16/fp16 tiles; float64 and CPU use PyTorch. Under ``"auto"`` the environment
    variable ``TRACT_LOSS_TRITON`` can override: ``0`` forces PyTorch (debugging, A/B timing),
    ``force`` uses Triton for any non-fp64 tile (the interpreter tests).
    """
    if kernel == "torch" or tile.dtype == torch.float64:
        return False
    if kernel == "triton":
        if not triton_kernels.HAS_TRITON:
            raise RuntimeError("loss kernel 'triton' requested but triton is not installed")
        if not tile.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("loss kernel 'triton' needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
        return True
    mode = os.environ.get("TRACT_LOSS_TRITON", "1")
    if not triton_kernels.HAS_TRITON or mode == "0":
        return False
    return tile.is_cuda or mode == "force"


def _work_block(rows: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """A fresh ``cdt`` copy of a row block. An explicit upcast then in-place ops: a mixed-dtype
    ``torch.sub(bf16, fp32)`` takes a promoting slow path on CPU (about 8x slower, measured)."""
    return rows.to(cdt, copy=True)


def torch_tile_stats(tile: torch.Tensor, cdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max and sum-exp relative to it, in ``cdt``; fp32 work in (contiguous) row blocks."""
    n, v = tile.shape
    m = tile.amax(dim=1).to(cdt)  # exact in any dtype
    s = torch.empty(n, dtype=cdt, device=tile.device)
    step = block_rows(n, v, tile.device)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        s[r0:r1] = _work_block(tile[r0:r1], cdt).sub_(m[r0:r1, None]).exp_().sum(dim=1)
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
    """dlogits = a * softmax - b * onehot(tgt_col) + sum_k e_k * onehot(score_col_k); -1 = absent.

    ``out`` (any float dtype; may be ``tile`` itself) receives the result. Row blocks are computed in
    ``lse.dtype`` (in place when the tile already has it) and the one-hot corrections are added to each
    block with masked scatters, so nothing depends on which columns are present (no host sync).
    """
    n, v = tile.shape
    if n == 0:
        return out
    cdt = lse.dtype
    zero = torch.zeros((), dtype=cdt, device=tile.device)
    t_idx = tgt_col.clamp_min(0)[:, None]
    t_val = torch.where(tgt_col >= 0, -b.to(cdt), zero)[:, None]
    k = score_col.numel()
    if k:
        s_idx = score_col.clamp_min(0)[None, :].expand(n, k).contiguous()
        s_val = torch.where(score_col[None, :] >= 0, e.to(cdt), zero)
    in_place = out.data_ptr() == tile.data_ptr() and tile.dtype == cdt
    step = block_rows(n, v, tile.device)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        g = out[r0:r1] if in_place else _work_block(tile[r0:r1], cdt)
        g.sub_(lse[r0:r1, None]).exp_().mul_(a[r0:r1, None])
        g.scatter_add_(1, t_idx[r0:r1], t_val[r0:r1])
        if k:
            g.scatter_add_(1, s_idx[r0:r1], s_val[r0:r1])
        if not in_place:
            out[r0:r1].copy_(g)
    return out


def tile_stats(tile: torch.Tensor, cdt: torch.dtype, kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(tile, kernel):
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
    kernel: str = "auto",
) -> torch.Tensor:
    """Overwrite ``tile`` (logits, any float dtype) with dlogits in the same dtype and return it."""
    if use_triton(tile, kernel):
        return triton_kernels.triton_tile_grad(tile, tile, lse, a, tgt_col, b, score_col, e)
    return torch_tile_grad(tile, tile, lse, a, tgt_col, b, score_col, e)
