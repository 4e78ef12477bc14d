"""A model's shape from its config alone: the model is built on the meta device (no memory, no weights).

Why build at all instead of reading config fields: the parameter count, the largest module (DeepSpeed's estimator
needs it), which tensors stay whole under ZeRO-3 and which linear layers PEFT's LoRA adapts are properties of the
transformers code, not of config.json. On the meta device they come out exact, for a 70B model in about two
seconds, and nothing is allocated or downloaded.

Where the config comes from (:func:`resolve_config`): the project's random-weight aliases, a local folder's
config.json, the built-in table of :mod:`tract_dist.plan.known`, and only then the hub (users with internet).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tract_dist.errors import TractError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from tract_dist.config import Config, LoraSection


class PlanUnavailable(TractError):
    """The model's config cannot be found without a download (offline, not in the table, no local folder)."""


@dataclass(frozen=True)
class ModelShape:
    """What sizes a decoder-only model: dimensions from its config, counts from its meta-device build."""

    name: str
    source: str  # where the config came from (alias, local folder, built-in table, hub)
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    max_positions: int
    params: int  # every parameter once (a tied head is the embedding)
    embedding_params: int  # the input embedding: a lookup, no matmul FLOPs
    largest_module_params: int  # DeepSpeed's "largest layer": the biggest module's own parameters
    param_numels: tuple[int, ...]  # each parameter tensor's size (ZeRO-3 keeps the small ones whole)
    qk_norm: bool = False  # Qwen3: RMSNorm on every query and key head
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    moe_layers: int = 0
    expert_params: int = 0  # the routed experts' weights, all layers

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def active_params(self) -> int:
        """Parameters one token passes through: the routed experts count by the share a token uses."""
        if not self.experts:
            return self.params
        return self.params - self.expert_params + self.expert_params * self.experts_per_token // self.experts

    @property
    def matmul_params(self) -> int:
        """Parameters in matmuls per token (the input embedding is a lookup; a tied head still multiplies)."""
        return self.active_params - (0 if self.tied else self.embedding_params)


@dataclass(frozen=True)
class LoraShape:
    """What PEFT's LoRA adds to a model, read from PEFT itself applied on the meta device."""

    trainable: int  # adapter parameters
    rank: int
    dropout: float
    adapted: tuple[tuple[str, int], ...]  # (module name in a decoder layer, in_features), one layer's adapters
    experts_adapted: bool  # PEFT >= 0.18 all-linear also wraps MoE experts' 3D weights


def resolve_config(cfg: Config) -> tuple[Any, str]:
    """(transformers config, where it came from) for ``cfg.model.name_or_path``, without any download unless the
    name is a hub id outside the table and the hub is reachable. Raises :class:`PlanUnavailable`."""
    from transformers import AutoConfig

    from tract_dist.aliases import RANDOM_ALIASES, is_random_model
    from tract_dist.plan.known import known_config

    name = cfg.model.name_or_path
    if is_random_model(name):
        from tract_dist.data.assets import load_tokenizer
        from tract_dist.models.tiny import tiny_llama_config

        shape = RANDOM_ALIASES.get(name, {})
        vocab = len(load_tokenizer(cfg.model.tokenizer)) if cfg.model.tokenizer else 512
        config = tiny_llama_config(vocab, tie=not shape, max_position_embeddings=max(256, cfg.data.max_length),
                                   **shape)
        return config, f"alias {name} (tract_dist.models.tiny)"
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return (AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.model.trust_remote_code),
                f"{path / 'config.json'}")
    fields = known_config(name)
    if fields is not None:
        model_type = fields.pop("model_type")
        return AutoConfig.for_model(model_type, **fields), f"built-in table ({name}; tract_dist/plan/known.py)"
    from tract_dist.aliases import check_model_source

    check_model_source(name)  # a missing local path, or offline: the run's own ConfigError, before any hub access
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        raise PlanUnavailable(f"model.name_or_path: no config for '{name}' without the hub (HF_HUB_OFFLINE=1): give "
                              "a local model folder, or one of the built-in models (tract-dist plan --list-models)")
    try:
        return (AutoConfig.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code),
                f"hub config.json of {name}")
    except (OSError, ValueError) as e:
        raise PlanUnavailable(f"model.name_or_path: cannot read the config of '{name}' ({str(e).splitlines()[0]})"
                              ) from None


def _text_config(config: PretrainedConfig) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def build_meta(config: PretrainedConfig) -> Any:
    """The causal LM of ``config`` on the meta device: real modules and shapes, no storage."""
    import torch
    from transformers import AutoModelForCausalLM

    from tract_dist.train.strategy import outside_zero3

    # While ZeRO-3's switch is on in this process (an in-process training run keeps it), transformers builds every
    # model under ZeRO's partitioned init and initialises it by copying data: not possible on the meta device.
    with outside_zero3(), torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def model_shape(config: PretrainedConfig, *, name: str, source: str, model: Any = None) -> ModelShape:
    """The :class:`ModelShape` of ``config`` (``model``: its meta build, if the caller already has one)."""
    model = model if model is not None else build_meta(config)
    tc = _text_config(config)
    params = {id(p): p for p in model.parameters()}  # a tied head appears once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    experts = int(getattr(tc, "num_experts", 0) or getattr(tc, "num_local_experts", 0) or 0)
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) if experts else 0
    moe_layers = sum(1 for n, _ in model.named_modules() if n.endswith(".mlp.experts")) if experts else 0
    emb = model.get_input_embeddings().weight.numel()
    return ModelShape(
        name=name, source=source, model_type=tc.model_type, hidden=tc.hidden_size, layers=tc.num_hidden_layers,
        heads=heads, kv_heads=getattr(tc, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate=tc.intermediate_size, vocab=tc.vocab_size,
        tied=model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        max_positions=getattr(tc, "max_position_embeddings", 0) or 0,
        params=sum(p.numel() for p in params.values()), embedding_params=emb, largest_module_params=largest,
        param_numels=tuple(p.numel() for p in params.values()),
        qk_norm=any(n.endswith("self_attn.q_norm") for n, _ in model.named_modules()),
        experts=experts, experts_per_token=int(getattr(tc, "num_experts_per_tok", 0) or 0),
        moe_intermediate=int(getattr(tc, "moe_intermediate_size", 0) or 0), moe_layers=moe_layers,
        expert_params=expert_params)


def lora_shape(model: Any, lora: LoraSection, config: PretrainedConfig | None = None) -> LoraShape:
    """Apply PEFT's LoRA (``lora``: the config's ``model.lora`` section) to a meta-device ``model`` and read off
    what it adds; the adapters are created on the meta device too, so a 70B model costs no memory.

    With ``config`` (the model's) and decoder layers that all hold the same parameters, PEFT is applied to 1- and
    2-layer builds of the same config and the count extended linearly to every layer: PEFT wraps each layer the
    same way, and wrapping 80 layers of a 70B model takes seconds where two take a fraction of one."""
    layers = _text_config(config).num_hidden_layers if config is not None else 0
    if layers > 2 and _homogeneous_layers(model):
        one, two = (_apply_lora(build_meta(_with_layers(config, n)), lora) for n in (1, 2))
        trainable = one.trainable + (two.trainable - one.trainable) * (layers - 1)
        return LoraShape(trainable, one.rank, one.dropout, one.adapted, one.experts_adapted)
    return _apply_lora(model, lora)


def _with_layers(config: PretrainedConfig, n: int) -> Any:
    """A copy of ``config`` with ``n`` decoder layers (per-layer lists cut to match)."""
    import copy

    config = copy.deepcopy(config)
    tc = _text_config(config)
    tc.num_hidden_layers = n
    if isinstance(getattr(tc, "layer_types", None), list):
        tc.layer_types = tc.layer_types[:n]
    return config


def _homogeneous_layers(model: Any) -> bool:
    """Whether every decoder layer holds the same parameters (names and sizes)."""
    import re

    layers: dict[str, list[tuple[str, int]]] = {}
    for name, p in model.named_parameters():
        m = re.search(r"\.layers\.(\d+)\.(.+)$", name)
        if m:
            layers.setdefault(m.group(1), []).append((m.group(2), p.numel()))
    return len({tuple(sorted(v)) for v in layers.values()}) == 1


def _apply_lora(model: Any, lora: LoraSection) -> LoraShape:
    import torch
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                        target_modules=targets)
    with torch.device("meta"):
        peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    layer0: list[tuple[str, int]] = []
    experts = False
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or not len(module.lora_A):
            continue
        if ".experts" in name:
            experts = True
            continue
        marker = ".layers.0."
        if marker in name:
            base = getattr(module, "base_layer", module)
            layer0.append((name.split(marker, 1)[1], int(getattr(base, "in_features", 0))))
    return LoraShape(trainable=trainable, rank=lora.r, dropout=lora.dropout, adapted=tuple(layer0),
                     experts_adapted=experts)
