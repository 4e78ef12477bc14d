"""Attention for CPU inference: PyTorch's fused sdpa for prefill, plain matmuls for one-token decode steps.

On CPU, ``scaled_dot_product_attention`` with a single query row is several times slower than the two small
matmuls and a softmax it stands for (this machine, bf16, 4 sequences x 9 heads x 1,000 keys: about 9 ms against
1.3 ms per call; ``benchmarks/runtime/bench_cpu_attention.py``), and a judge's CoT is decoded one token at a time
through every layer. Prefill and training (many query rows) keep sdpa, which is the faster path there. The
dispatch is registered under :data:`NAME` with transformers' ``AttentionInterface`` (its extension point for
attention functions), so the model code is untouched.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "sdpa_cpu_decode"


def _decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for a query of one position, in float32 at least (as sdpa accumulates) and
    rounded once to the model dtype; returns (B, 1, H, D) like sdpa_attention_forward.

    Grouped-query heads are folded onto their key/value head (query head h reads kv head h // groups, the order
    ``repeat_kv`` makes), so the cache is read as it is, never repeated."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    compute = torch.promote_types(query.dtype, torch.float32)
    q = query.to(compute).reshape(batch, kv_heads, heads // kv_heads, dim)  # (B, Hkv, groups, D)
    scale = scaling if scaling is not None else dim ** -0.5
    scores = torch.matmul(q, key.to(compute).transpose(-1, -2)) * scale  # (B, Hkv, groups, L)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]  # (B, 1, 1, L): broadcasts over heads and groups
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask.to(compute))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value.to(compute))  # (B, Hkv, groups, D)
    return out.reshape(batch, 1, heads, dim).to(query.dtype)


def sdpa_cpu_decode_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: the matmul path for a one-token CPU step without dropout or
    extras (soft-capping, sinks, position bias, a paged cache), sdpa for everything else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (query.shape[2] == 1 and query.device.type == "cpu" and not (dropout and module.training)
             and not any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias", "cache",
                                                               "sliding_window")))
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return _decode_attention(module, query, key, value, attention_mask, scaling), None


def register() -> str:
    """Register :data:`NAME` with transformers (idempotent; every process that loads a model calls it)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, sdpa_cpu_decode_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks sdpa gets, for both paths
    return NAME
