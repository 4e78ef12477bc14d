"""Final hidden states and the lm_head of a Hugging Face causal LM, without computing logits.

The CoT-RAFT loss fuses the lm_head matmul with the softmax, so the model must stop at the final
(post-norm) hidden states: the full (B, T, V) logits are the largest activation in judge training.
"""

from __future__ import annotations

import torch
from torch import nn

from .packed_attention import packed_attention_kwargs, register_packed_sdpa

register_packed_sdpa()  # a valid attn_implementation in every process that computes hidden states

# Config attributes that make HF's logits differ from ``hidden @ W.T + b``. None of the supported
# families (Llama, Mistral, Qwen2) sets them; refuse models that do rather than silently diverge.
_LOGIT_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # Gemma2+, Cohere, Granite


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The HF ``*ForCausalLM`` inside a PEFT ``PeftModel`` (LoRA-style adapters only).

    LoRA injects its layers into the base model's modules in place, so calling the base decoder runs
    the adapters. Prompt-learning methods prepend virtual tokens in ``PeftModel.forward``, which the
    hidden-state path would skip, so they are rejected.
    """
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional at runtime
        PeftModel = ()  # type: ignore[assignment]
    if PeftModel and isinstance(model, PeftModel):
        config = model.peft_config[model.active_adapter]
        if getattr(config, "is_prompt_learning", False):
            raise NotImplementedError("prompt-learning PEFT methods are not supported by the hidden-state path")
        model = model.get_base_model()
    if not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"{type(model).__name__} is not a Hugging Face causal LM")
    for attr in _LOGIT_MODIFIERS:
        if getattr(model.config, attr, None) not in (None, 1.0):
            raise NotImplementedError(f"config.{attr} modifies logits; not supported by the fused loss path")
    return model


def final_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T, H) hidden states after the final norm, i.e. the lm_head's input, via the bare decoder.

    ``position_ids`` that restart at 0 inside a row, with no ``attention_mask``, are transformers' packed-sequence
    format: its mask builder then confines attention to each example (sdpa / eager: a block-diagonal mask,
    ``masking_utils.find_packed_sequence_indices``). ``cu_seq_lens`` (the examples' start offsets) lets
    flash-attention and :data:`~tract_dist.models.packed_attention.PACKED_SDPA` run each example alone instead."""
    lm = unwrap_causal_lm(model)
    decoder = lm.get_decoder()
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
        # a tree mask (multi-token score scales, train.data.tree_batch): additive, as every attention with masks
        # takes it (transformers passes a 4D mask through unchanged)
        dtype = lm.get_input_embeddings().weight.dtype
        attention_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
            ~attention_mask, torch.finfo(dtype).min)
    extra = packed_attention_kwargs(getattr(lm.config, "_attn_implementation", None) or "", cu_seq_lens)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                  return_dict=True, **extra)
    return out.last_hidden_state


def lm_head_parameters(model: nn.Module) -> tuple[nn.Parameter, nn.Parameter | None]:
    """The output projection's weight (V, H) and bias (or None).

    With tied embeddings the returned weight *is* the input embedding's Parameter, so the loss's
    gradient and the embedding's gradient accumulate into the same ``.grad`` (and, under ZeRO-3, the
    same partition) with no extra bookkeeping.
    """
    head = unwrap_causal_lm(model).get_output_embeddings()
    if not isinstance(head, nn.Linear) or hasattr(head, "base_layer"):
        raise NotImplementedError(
            f"lm_head of type {type(head).__name__} (e.g. a LoRA-wrapped head) is not supported; "
            "keep the lm_head out of the adapter's target_modules"
        )
    return head.weight, head.bias
