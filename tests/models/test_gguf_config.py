"""An export of a model loaded from GGUF (the smollm2 alias) must not claim GGUF quantisation: its weights are
plain tensors, and vLLM refuses a folder whose config says "gguf"."""

from __future__ import annotations

import json

import torch
from transformers import AutoConfig, LlamaConfig

from tract_dist.models.loading import drop_gguf_quantization
from tract_dist.train.export import save_hf_dir


class _NoTokenizer:
    def save_pretrained(self, out):  # the tokenizer is not what this test is about
        pass


def _config(quant):
    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False)
    cfg.quantization_config = quant
    return cfg


def test_export_of_a_gguf_loaded_model_has_no_quantization_config(tmp_path):
    cfg = _config({"quant_method": "gguf", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dequantize": False})
    save_hf_dir({"lm_head.weight": torch.zeros(32, 8)}, cfg, _NoTokenizer(), tmp_path / "model")
    written = json.loads((tmp_path / "model" / "config.json").read_text())
    assert "quantization_config" not in written
    assert not hasattr(AutoConfig.from_pretrained(tmp_path / "model"), "quantization_config")
    assert cfg.quantization_config["quant_method"] == "gguf"  # the live model's config is left alone


def test_other_quantization_configs_are_kept():
    cfg = _config({"quant_method": "bitsandbytes", "load_in_4bit": True})
    drop_gguf_quantization(cfg)
    assert cfg.quantization_config["quant_method"] == "bitsandbytes"


def test_export_names_the_model_class(tmp_path):
    """A config built in code (tiny, random and GGUF seeds) names no class; the export must (vLLM and MLflow's
    transformers flavour choose the class from config.architectures), as model.save_pretrained would."""
    from transformers import LlamaForCausalLM

    cfg = _config(None)
    del cfg.quantization_config
    assert not cfg.architectures
    save_hf_dir({"lm_head.weight": torch.zeros(32, 8)}, cfg, _NoTokenizer(), tmp_path / "model")
    reference = tmp_path / "reference"
    LlamaForCausalLM(cfg).save_pretrained(reference)
    written = json.loads((tmp_path / "model" / "config.json").read_text())["architectures"]
    assert written == json.loads((reference / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
