"""Tiny deterministic Llama models: fast stand-ins for real judges in tests and smoke configs."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from .zero3 import is_zero3_param


def tiny_llama_config(
    vocab_size: int = 512,
    *,
    tie: bool = True,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 256,
    attn_implementation: str = "eager",
) -> LlamaConfig:
    """A Llama config small enough for CPU tests but with the real architecture (GQA, RoPE, RMSNorm).

    ``tie`` selects tied input/output embeddings (as in SmolLM2), the case where the lm_head weight is
    the embedding weight and receives gradient from both uses. Eager attention keeps float64 runs exact.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        use_cache=False,
    )
    config._attn_implementation = attn_implementation
    return config


def build_tiny_model(
    config: LlamaConfig | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """Build a tiny Llama with weights that depend only on ``seed`` (same on every rank and run).

    Weights are drawn from a private generator rather than HF's initialiser so that two builds, in
    different processes or under DeepSpeed, can be compared parameter by parameter. Norm weights get a
    small perturbation around 1 so that their gradients are non-trivial.

    With a live ``HfDeepSpeedConfig`` for ZeRO-3 the model is born partitioned (``from_config`` enters
    DeepSpeed's ``zero.Init``) and the weights are written one gathered parameter at a time, so no rank
    ever holds the whole model; every rank must call this then. ``dtype`` must stay float32 in that
    case (DeepSpeed's config decides the training dtype).
    """
    config = config if config is not None else tiny_llama_config()
    model = AutoModelForCausalLM.from_config(config)
    if any(is_zero3_param(p) for p in model.parameters()):
        if dtype != torch.float32:
            raise ValueError("under ZeRO-3 build in float32 and let the DeepSpeed config pick the dtype")
        _fill_deterministic_zero3_(model, seed=seed)
        return model
    fill_deterministic_(model, seed=seed)
    return model.to(dtype)


@torch.no_grad()
def _fill_deterministic_zero3_(model: torch.nn.Module, *, seed: int) -> None:
    from tract_dist.train.strategy import gathered

    values = deterministic_state_dict(model, seed=seed)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for name, param in model.named_parameters():
        with gathered([param], modifier_rank=0):  # rank 0 writes, then broadcast
            if rank == 0:
                param.data.copy_(values[name].to(param.dtype))


@torch.no_grad()
def deterministic_state_dict(model: torch.nn.Module, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The values :func:`fill_deterministic_` would write, keyed by (deduplicated) parameter name.

    Exposed separately so a ZeRO-3 partitioned model can load them one gathered parameter at a time.
    """
    gen = torch.Generator().manual_seed(seed)
    values: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():  # shared (tied) parameters appear once
        shape = getattr(param, "ds_shape", param.shape)
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        elif name.endswith("bias"):
            value = 0.02 * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            value = 0.08 * torch.randn(shape, generator=gen, dtype=torch.float64)
        values[name] = value.to(torch.float32)
    return values


@torch.no_grad()
def fill_deterministic_(model: torch.nn.Module, *, seed: int = 0) -> None:
    """Overwrite every (non-partitioned) parameter in place with :func:`deterministic_state_dict`."""
    values = deterministic_state_dict(model, seed=seed)
    for name, param in model.named_parameters():
        param.copy_(values[name].to(param.dtype))
