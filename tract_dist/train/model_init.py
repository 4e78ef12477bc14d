"""Build the model a training worker fine-tunes: partitioned at load time under ZeRO-3, LoRA optional.

Under ZeRO-3 the strategy keeps its ZeRO-3 switch on while this runs (``DeepSpeedStrategy.partition_at_load``), so ``from_pretrained`` /
``from_config`` enter DeepSpeed's ``zero.Init`` and no rank ever materialises the whole model.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from tract_dist.aliases import RANDOM_ALIASES, is_random_model

if TYPE_CHECKING:
    from tract_dist.config import Config, LoraSection

log = logging.getLogger(__name__)


def attn_implementation(requested: str | None, use_cuda: bool) -> str:
    """flash_attention_2 when flash-attn is importable on CUDA, else sdpa; an explicit setting wins."""
    from tract_dist.models.loading import choose_attn_implementation

    return choose_attn_implementation(requested, "cuda" if use_cuda else "cpu")


def training_dtype(setting: str, use_cuda: bool) -> torch.dtype:
    """The compute dtype of a run: the same rule as inference (auto: bf16 on GPU, fp32 on CPU)."""
    from tract_dist.models.loading import resolve_dtype

    return resolve_dtype(setting, "cuda" if use_cuda else "cpu")


def _multi_token_scale(cfg: Config, tokenizer: Any) -> bool:
    from tract_dist.data.score_scale import derive_score_scale

    return not derive_score_scale(tokenizer, cfg.data.scale).single_token


def load_training_model(cfg: Config, tokenizer: Any, *, use_cuda: bool) -> torch.nn.Module:
    """The seed model named by ``cfg.model`` (HF path/name, ``smollm2``, or ``tiny-llama`` for smoke runs)."""
    from transformers import AutoModelForCausalLM

    from tract_dist.models.loading import materialize_alias

    m = cfg.model
    attn = attn_implementation(m.attn_implementation, use_cuda)
    if "flash" in attn and _multi_token_scale(cfg, tokenizer):
        # the trie-node tokens of a multi-token scale need a tree mask, which flash-attention's kernels do not take
        log.warning("data.scale %s has multi-token values: training attention %s -> sdpa (tree mask)",
                    cfg.data.scale, attn)
        attn = "sdpa"
    if cfg.training.packing:
        from tract_dist.models.packed_attention import packed_implementation

        attn = packed_implementation(attn)  # sdpa per example of a packed row, not over the row's whole square
    if is_random_model(m.name_or_path):
        from tract_dist.models.tiny import build_tiny_model, tiny_llama_config

        shape = RANDOM_ALIASES.get(m.name_or_path, {})
        config = tiny_llama_config(len(tokenizer), tie=not shape, max_position_embeddings=max(256, cfg.data.max_length),
                                   attn_implementation=attn, **shape)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        if shape:  # HF's own initialiser: the deterministic float64 fill is for tiny test models only
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            model = build_tiny_model(config, seed=cfg.training.seed)
    else:
        # An alias with GGUF weights (smollm2) loads from its cached de-quantised HF folder, as inference does:
        # de-quantising in every worker took ~10 s and ~5 GB of memory per rank; the folder is a memory map.
        # The driver materialises it before the workers start (trainer.py), so they never convert it twice.
        path = materialize_alias(m.name_or_path)
        # fp32 master weights under DeepSpeed; its bf16 setting casts the working copy.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn,
                                                     trust_remote_code=m.trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # from_pretrained returns the model in eval mode; transformers recomputes a layer only while training
    # (GradientCheckpointingLayer checks self.training) and dropout (LoRA's included) acts only then, so without
    # this both settings would silently do nothing (the plan's memory benchmark found it: a checkpointed
    # SmolLM2 step kept every layer's activations).
    model.train()
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if m.lora.enabled:
        model = wrap_lora(model, m.lora)
    return model


def wrap_lora(model: torch.nn.Module, lora: LoraSection) -> torch.nn.Module:
    """PEFT LoRA on ``model`` from ``model.lora`` (REAL's rollout engines build the same wrapper)."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                        target_modules=targets if targets != "all-linear" else "all-linear")
    return get_peft_model(model, config)
