"""A tiny random Llama with a real tokenizer, saved as an HF folder: a stand-in for a stage-1 export.

Tests, smoke configs and the generation benchmark need a model *path* that every loader accepts (the same
path a real stage-1 export has) but that generates in milliseconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path


def save_tiny_export(out_dir: str | Path, tokenizer: str = "smollm2", *, seed: int = 0, hidden_size: int = 64,
                     num_layers: int = 2, max_positions: int = 4096) -> Path:
    """Write a deterministic tiny Llama (vocabulary of ``tokenizer``) plus the tokenizer to ``out_dir``."""
    from tract_dist.data.assets import load_tokenizer
    from tract_dist.models.tiny import build_tiny_model, tiny_llama_config

    out = Path(out_dir)
    tok = load_tokenizer(tokenizer)
    config = tiny_llama_config(len(tok), hidden_size=hidden_size, num_layers=num_layers,
                               intermediate_size=2 * hidden_size, max_position_embeddings=max_positions)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    config.use_cache = True
    model = build_tiny_model(config, seed=seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
