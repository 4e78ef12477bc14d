"""``out (+)= a @ b`` with a higher-precision ``out`` (bf16 operands, fp32 accumulator) and no full temporary.

On CUDA, torch's ``mm``/``addmm`` take ``out_dtype`` (cuBLAS multiplies bf16 and writes or accumulates
fp32 directly, beta = 1). The CPU build of torch 2.13 has no such kernel (``aten::mm.dtype`` is
registered for CUDA only), so there the product is formed in the operands' dtype in row blocks and added
into the accumulator: the temporary stays at ``TEMP_BYTES`` whatever the accumulator's size.
"""

from __future__ import annotations

import functools

import torch

#: CPU fallback temporary (bf16 row block of the product): 32 MiB, a few percent of the fused loss's tile.
TEMP_BYTES = 1 << 25


@functools.lru_cache(maxsize=None)
def cuda_out_dtype_supported(device_index: int) -> bool:
    """Whether ``torch.mm/addmm(..., out_dtype=float32, out=acc)`` works and is right on this GPU.

    Probed once per device on a small case against an fp32 reference (present in torch >= 2.8 on CUDA;
    an older or odd build falls back to the blocked path instead of failing)."""
    dev = torch.device("cuda", device_index)
    try:
        a = torch.randn(64, 32, device=dev).to(torch.bfloat16)
        b = torch.randn(32, 48, device=dev).to(torch.bfloat16)
        acc = torch.ones(64, 48, device=dev)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        first = torch.empty(64, 48, device=dev)
        torch.mm(a, b, out_dtype=torch.float32, out=first)
        ref = a.float() @ b.float()
        return bool(torch.allclose(acc, ref + 1, atol=1e-3) and torch.allclose(first, ref, atol=1e-3))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """``out = a @ b`` (``accumulate=False``) or ``out += a @ b``, ``out`` possibly of a wider dtype."""
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if out.is_cuda and cuda_out_dtype_supported(out.device.index or 0):
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
        return
    rows = max(1, TEMP_BYTES // max(b.shape[1] * a.element_size(), 1))
    for r0 in range(0, out.shape[0], rows):
        part = a[r0 : r0 + rows] @ b
        if accumulate:
            out[r0 : r0 + rows] += part
        else:
            out[r0 : r0 + rows].copy_(part)
