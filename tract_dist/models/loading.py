"""One way to load a causal LM for every stage: aliases, dtype, attention kernel, no remote code by default.

Why one loader: generation, judging, evaluation and training must see the same weights, dtype and attention
implementation, or the numbers drift between stages. Offline aliases with GGUF weights (``smollm2``) are
dequantised once and cached as a plain Hugging Face folder (safetensors + tokenizer): dequantising takes
~20 s per process, loading the cached folder is a memory map (well under a second), which matters when a
Ray actor pool loads one replica per worker.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tract_dist.models import cpu_attention
from tract_dist.data.assets import model_source
from tract_dist.fsutil import publish_dir_once

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_ALIAS_CACHE_VERSION = "v2"  # v2: config.json without the GGUF quantization_config (vLLM loads it)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cache_dir() -> Path:
    return Path(os.environ.get("TRACT_DIST_CACHE", Path.home() / ".cache" / "tract-dist"))


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``: CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """``auto`` = bf16 on CUDA (the training dtype), fp32 on CPU: bf16 matmuls are slow on CPUs without
    AVX512-BF16/AMX (on one with them, e.g. AMD Zen 4, they are faster than fp32: ask for bfloat16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def choose_attn_implementation(requested: str | None = None, device: str | torch.device | None = None) -> str:
    """``flash_attention_2`` when flash_attn is importable and the model runs on CUDA, ``sdpa`` on other
    accelerators, and on CPU sdpa with one-token decode steps as plain matmuls (:mod:`.cpu_attention`)."""
    if requested:
        if requested == cpu_attention.NAME:
            cpu_attention.register()
        return requested
    dev = resolve_device(device).type
    if dev == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if dev == "cpu":
        return cpu_attention.register()
    return "sdpa"


def drop_gguf_quantization(config: PretrainedConfig) -> None:
    """Remove a GGUF ``quantization_config`` from ``config`` (and its ``text_config``), in place.

    transformers dequantises GGUF weights when it loads them, so a model loaded from GGUF holds plain tensors
    while its config still says "gguf": a folder saved with that config describes weights it does not hold, and
    loaders that honour it refuse it (vLLM: "Unknown quantization method: gguf"). Other quantisation methods
    describe the saved weights and are kept.
    """
    for cfg_obj in (config, getattr(config, "text_config", None)):
        q = getattr(cfg_obj, "quantization_config", None) if cfg_obj is not None else None
        method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
        if q is not None and str(getattr(method, "value", method)).lower() == "gguf":
            del cfg_obj.quantization_config


def materialize_alias(name_or_path: str) -> str:
    """A local HF folder for ``name_or_path``: aliases with GGUF weights are converted once and cached.

    Anything that is not such an alias (a local folder, a hub name) is returned unchanged.
    """
    path, extra = model_source(name_or_path)
    if "gguf_file" not in extra:
        return path
    dest = _cache_dir() / "models" / f"{name_or_path}-{_ALIAS_CACHE_VERSION}"
    if (dest / "config.json").exists() and (dest / "tokenizer_config.json").exists():
        return str(dest)
    from transformers import AutoModelForCausalLM

    from tract_dist.data.assets import load_tokenizer

    gguf = AutoModelForCausalLM.from_pretrained(path, **extra)  # dequantised to fp32
    plain = AutoModelForCausalLM.from_config(gguf.config)  # GGUF-backed models refuse save_pretrained
    plain.load_state_dict(gguf.state_dict())
    drop_gguf_quantization(plain.config)
    plain.generation_config = gguf.generation_config

    def build(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        load_tokenizer(name_or_path).save_pretrained(tmp)

    publish_dir_once(dest, build)  # a second replica converting at the same time: the first copy wins
    return str(dest)


def load_causal_lm(name_or_path: str, *, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
                   attn_implementation: str | None = None, trust_remote_code: bool = False) -> Any:
    """Load a causal LM (alias, local folder or hub name) onto ``device`` with the project's dtype/attention rules.

    Remote code runs only when ``trust_remote_code`` is asked for explicitly.
    """
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    source = materialize_alias(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=resolve_dtype(dtype, dev),
        attn_implementation=choose_attn_implementation(attn_implementation, dev),
        trust_remote_code=trust_remote_code,
    )
    return model.to(dev)


def load_tokenizer_for(name_or_path: str, tokenizer: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model: ``tokenizer`` if given, else the model folder's own (aliases via assets)."""
    from tract_dist.aliases import TOKENIZER_ALIASES
    from tract_dist.data.assets import load_tokenizer

    name = tokenizer or name_or_path
    if name in TOKENIZER_ALIASES:
        return load_tokenizer(name)
    return load_tokenizer(name, trust_remote_code=trust_remote_code)
