"""Architectures the planner knows without a download: the config.json fields that size a model.

``tract-dist plan`` must answer before anything is fetched, on a laptop or a head node without the weights, so
the models the project's configs name carry their shapes here. Each entry is the published config.json of the
hub repository, reduced to what changes parameter counts, activations and the KV cache; the test
``tests/plan/test_plan.py`` checks that each one builds (on the meta device) to the exact parameter count the
hub publishes for its safetensors, which fails on any wrong field.
"""

from __future__ import annotations

from typing import Any

_LLAMA31 = dict(model_type="llama", vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192},
                rms_norm_eps=1e-5, tie_word_embeddings=False, num_key_value_heads=8)
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
              rms_norm_eps=1e-6, head_dim=128, num_key_value_heads=8, tie_word_embeddings=False)

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(_LLAMA31, hidden_size=4096, intermediate_size=14336,
                                             num_hidden_layers=32, num_attention_heads=32),
    "meta-llama/Llama-3.1-70B-Instruct": dict(_LLAMA31, hidden_size=8192, intermediate_size=28672,
                                              num_hidden_layers=80, num_attention_heads=64),
    "mistralai/Mistral-7B-Instruct-v0.2": dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                                               intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                               num_key_value_heads=8, max_position_embeddings=32768,
                                               rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False),
    "Qwen/Qwen3-8B": dict(_QWEN3, hidden_size=4096, intermediate_size=12288,
                          num_hidden_layers=36, num_attention_heads=32),
    "Qwen/Qwen3-32B": dict(_QWEN3, hidden_size=5120, intermediate_size=25600,
                           num_hidden_layers=64, num_attention_heads=64),
    "Qwen/Qwen3-30B-A3B": dict(_QWEN3, model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                               moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                               num_key_value_heads=4, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                               decoder_sparse_step=1, mlp_only_layers=[]),
    # The offline ``smollm2`` alias (its GGUF dequantises to this shape: 134,515,008 parameters).
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                                                intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                                num_key_value_heads=3, max_position_embeddings=8192,
                                                rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
#: Published parameter totals of the entries above (the hub's safetensors metadata), for the test.
PUBLISHED_PARAMS: dict[str, int] = {
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "meta-llama/Llama-3.1-70B-Instruct": 70_553_706_496,
    "mistralai/Mistral-7B-Instruct-v0.2": 7_241_732_096,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "Qwen/Qwen3-32B": 32_762_123_264,
    "Qwen/Qwen3-30B-A3B": 30_532_122_624,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 134_515_008,
}
#: Offline aliases of tract-dist whose weights have one of the shapes above.
ALIAS_CONFIGS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def known_config(name: str) -> dict[str, Any] | None:
    """The table's config.json fields for a hub id (case-insensitive) or alias; None when not in the table."""
    name = ALIAS_CONFIGS.get(name, name)
    for key, fields in KNOWN_CONFIGS.items():
        if key.lower() == name.lower():
            return dict(fields)
    return None
