"""Triton kernels for the per-tile softmax work of the fused CoT-RAFT loss.

The matmuls (logits tile, grad_hidden, grad_weight) stay in cuBLAS via torch; these kernels do the
memory-bound elementwise part on a (rows x vocab-shard) logits tile, one program per row, as
Liger-Kernel's fused linear cross entropy does. Numerics are fp32 in registers whatever the tile dtype.

Interpreter notes (``TRITON_INTERPRET=1`` on CPU): no ``tl.dot`` here, and no libdevice calls, so the
kernels run under the interpreter unchanged; fp32 -> bf16 stores truncate there instead of rounding.
"""

from __future__ import annotations

import torch

try:  # triton is an optional dependency (gpu / test extras)
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

MAX_BLOCK = 8192


if HAS_TRITON:

    @triton.jit
    def _tile_stats_kernel(
        tile_ptr, stride_row, n_cols, max_ptr, sumexp_ptr, BLOCK: tl.constexpr
    ):
        """Per row: m = max_j z_j and s = sum_j exp(z_j - m) with an online merge over blocks."""
        row = tl.program_id(0).to(tl.int64)
        base = tile_ptr + row * stride_row
        offs = tl.arange(0, BLOCK)
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        tl.store(max_ptr + row, m)
        tl.store(sumexp_ptr + row, s)

    @triton.jit
    def _tile_grad_kernel(
        tile_ptr, stride_row, out_ptr, out_stride_row, n_cols,
        lse_ptr, a_ptr, tgt_ptr, b_ptr, score_col_ptr, e_ptr, e_stride_row, n_score,
        BLOCK: tl.constexpr,
    ):
        """dlogits_j = a * softmax_j - b * [j == tgt] + sum_k e_k * [j == score_col_k].

        ``tgt`` / ``score_col`` are tile-local column indices, -1 when outside this tile. ``out`` may
        alias ``tile`` (in-place): each element is read before it is written by the same program.
        """
        row = tl.program_id(0).to(tl.int64)
        base = tile_ptr + row * stride_row
        obase = out_ptr + row * out_stride_row
        lse = tl.load(lse_ptr + row)
        a = tl.load(a_ptr + row)
        b = tl.load(b_ptr + row)
        tgt = tl.load(tgt_ptr + row)
        offs = tl.arange(0, BLOCK)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            g = a * tl.exp(x - lse)
            g = tl.where(cols == tgt, g - b, g)
            for k in range(0, n_score):
                col = tl.load(score_col_ptr + k)
                ek = tl.load(e_ptr + row * e_stride_row + k)
                g = tl.where(cols == col, g + ek, g)
            tl.store(obase + cols, g.to(out_ptr.dtype.element_ty), mask=mask)


def _block(n_cols: int, block: int | None) -> int:
    if block is not None:
        return block
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(max(n_cols, 1))))


def _warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def triton_tile_stats(tile: torch.Tensor, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max and row sum-exp (relative to that max) of a 2-D logits tile, both fp32."""
    assert tile.stride(1) == 1, "tile rows must be contiguous"
    n, v = tile.shape
    m = torch.empty(n, dtype=torch.float32, device=tile.device)
    s = torch.empty(n, dtype=torch.float32, device=tile.device)
    if n == 0:
        return m, s
    blk = _block(v, block)
    _tile_stats_kernel[(n,)](tile, tile.stride(0), v, m, s, BLOCK=blk, num_warps=_warps(blk))
    return m, s


def triton_tile_grad(
    tile: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    a: torch.Tensor,
    tgt_col: torch.Tensor,
    b: torch.Tensor,
    score_col: torch.Tensor,
    e: torch.Tensor,
    block: int | None = None,
) -> torch.Tensor:
    """Write dlogits of the tile into ``out`` (may be ``tile`` itself). Row vectors are fp32."""
    assert tile.stride(1) == 1 and out.stride(1) == 1
    n, v = tile.shape
    if n == 0:
        return out
    if score_col.numel() == 0:  # keep valid pointers for the (unused) score arguments
        score_col = torch.full((1,), -1, dtype=torch.int64, device=tile.device)
        e = torch.zeros((n, 1), dtype=torch.float32, device=tile.device)
        n_score = 0
    else:
        n_score = int(score_col.numel())
    e = e.float().contiguous()
    blk = _block(v, block)
    _tile_grad_kernel[(n,)](
        tile, tile.stride(0), out, out.stride(0), v,
        lse.float().contiguous(), a.float().contiguous(), tgt_col.to(torch.int64).contiguous(),
        b.float().contiguous(), score_col.to(torch.int64).contiguous(), e, e.stride(0),
        n_score, BLOCK=blk, num_warps=_warps(blk),
    )
    return out
