"""Attention confined to each example of a packed row with torch's sdpa: one causal sdpa call per example.

transformers reads position ids that restart at 0 as packed sequences. With sdpa or eager it then builds a dense
block-diagonal (T, T) mask for the row and computes every block of it, the cross-example ones included (masked,
not skipped): a row of k similar examples costs about k times the attention of its examples alone.
flash-attention's variable-length kernel skips them; where flash-attn is not installed (CPU, or a GPU without the
package) this function does the same with the kernel at hand: each example's queries, keys and values go through
transformers' own ``sdpa_attention_forward`` with ``is_causal=True`` (so torch's flash / memory-efficient kernels
also skip the upper triangle). The arithmetic is the padded batch's, example by example.

It is registered with transformers' ``AttentionInterface`` as :data:`PACKED_SDPA` (the extension point transformers
provides for attention kernels); training selects it for packed runs whose attention would be sdpa, or the CPU
default that is sdpa for training (:func:`packed_implementation`, :func:`tract_dist.train.model_init.load_training_model`). No mask function is registered with it, so
transformers builds no (T, T) mask; a call without ``packed_seq_bounds`` is plain causal sdpa, which is exact for
the right-padded batches training makes (real tokens precede the padding, so causality alone keeps them off it).
The name is not saved with a model (``save_pretrained`` writes no attention implementation).
"""

from __future__ import annotations

from typing import Any

import torch

PACKED_SDPA = "tract_packed_sdpa"


def packed_sdpa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                  scaling: float | None = None, packed_seq_bounds: tuple[int, ...] | None = None,
                                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``query`` (1, H, T, D) of one packed row; ``packed_seq_bounds`` the examples' start offsets and T. Returns
    (1, T, H, D) as every transformers attention function does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    if packed_seq_bounds is None or attention_mask is not None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    outs = []
    for start, end in zip(packed_seq_bounds[:-1], packed_seq_bounds[1:]):
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                        value[:, :, start:end], None, dropout=dropout, scaling=scaling,
                                        is_causal=True, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), None


def packed_implementation(implementation: str) -> str:
    """The attention a packed training run uses in place of ``implementation``: :data:`PACKED_SDPA` for the ones
    that run training-shaped calls through sdpa (``sdpa``, and the CPU default
    :data:`tract_dist.models.cpu_attention.NAME`, which is sdpa but for one-token decode steps, never made in
    training); any other (flash-attention's varlen kernel, eager, flex) as it is."""
    from tract_dist.models import cpu_attention

    if implementation in ("sdpa", cpu_attention.NAME):
        return register_packed_sdpa()
    return implementation


def register_packed_sdpa() -> str:
    """Make :data:`PACKED_SDPA` a valid ``attn_implementation`` in this process (idempotent); returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
    return PACKED_SDPA


def packed_attention_kwargs(implementation: str, cu_seq_lens: torch.Tensor | None) -> dict[str, Any]:
    """What the decoder needs, beyond per-example position ids, to keep a packed row's attention inside its
    examples with ``implementation``: the example bounds for :data:`PACKED_SDPA`, flash-attention's varlen
    arguments (so it need not infer them from the position ids), nothing for sdpa / eager (their block mask comes
    from the position ids). ``cu_seq_lens``: (S + 1,) start offsets of the row's examples and its length."""
    if cu_seq_lens is None:
        return {}
    if implementation == PACKED_SDPA:
        return {"packed_seq_bounds": tuple(int(x) for x in cu_seq_lens.tolist())}  # one host read per forward
    if implementation.startswith("flash_attention"):
        cu = cu_seq_lens.to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    return {}
