"""models.loading: dtype and attention rules, alias materialisation, no remote code unless asked."""

from __future__ import annotations

import pytest
import torch

from tract_dist.models import cpu_attention, loading


def test_dtype_and_attention_rules(monkeypatch):
    assert loading.resolve_dtype("auto", "cpu") is torch.float32
    assert loading.resolve_dtype("auto", "cuda") is torch.bfloat16
    assert loading.resolve_dtype("float16", "cpu") is torch.float16
    with pytest.raises(ValueError, match="dtype"):
        loading.resolve_dtype("fp8", "cpu")
    assert loading.choose_attn_implementation(None, "cpu") == cpu_attention.NAME  # sdpa, decode steps as matmuls
    assert loading.choose_attn_implementation("eager", "cuda") == "eager"
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert loading.choose_attn_implementation(None, "cuda") == "flash_attention_2"
    assert loading.choose_attn_implementation(None, "cpu") == cpu_attention.NAME


def test_load_passes_options_and_no_remote_code(tiny_export, monkeypatch):
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, **kw):
        seen.update(kw)
        return real(path, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model = loading.load_causal_lm(tiny_export)
    assert seen["trust_remote_code"] is False and seen["attn_implementation"] == cpu_attention.NAME
    assert seen["dtype"] is torch.float32 and next(model.parameters()).dtype is torch.float32
    loading.load_causal_lm(tiny_export, dtype="bfloat16", attn_implementation="eager")
    assert seen["dtype"] is torch.bfloat16 and seen["attn_implementation"] == "eager"


def test_plain_paths_are_not_rewritten(tiny_export):
    assert loading.materialize_alias(tiny_export) == tiny_export

