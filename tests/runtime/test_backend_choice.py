"""Backend selection: auto's rule, the logged choice, and a clear config error (exit 2) when vLLM cannot run."""

from __future__ import annotations

import sys

import pytest

from tract_dist.config import ConfigError, load_config
from tract_dist.runtime import backend


@pytest.fixture
def no_vllm(monkeypatch):
    """vLLM absent, as on a machine without it: ``import vllm`` fails and ``find_spec`` finds nothing."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setattr(backend, "_VLLM_STATUS", None)


def test_explicit_backends_and_auto_on_cpu(monkeypatch):
    assert backend.resolve_backend("hf", "generation.backend", gpu=False).backend == "hf"
    assert backend.resolve_backend("transformers", "generation.backend", gpu=True).backend == "hf"
    assert backend.resolve_backend("auto", "generation.backend", gpu=False).backend == "hf"
    monkeypatch.setattr(backend, "_VLLM_STATUS", (True, "vllm 0.32.0"))
    assert backend.resolve_backend("auto", "evaluation.backend", gpu=True).backend == "vllm"
    assert backend.resolve_backend("vllm", "evaluation.backend", gpu=False).backend == "vllm"


def test_auto_falls_back_to_hf_without_vllm(no_vllm):
    choice = backend.resolve_backend("auto", "generation.backend", gpu=True)
    assert choice.backend == "hf" and "not installed" in choice.reason


def test_vllm_requested_without_vllm_is_a_config_error(no_vllm, quickstart_data, tmp_path):
    from tract_dist.generate.pipeline import GenerateSpec, generate_cots

    cfg = load_config(None, ["model.name_or_path=smollm2", f"data.train_path={quickstart_data}",
                             "data.train_format=jsonl", "generation.ray=false", "tracking.enabled=false",
                             "generation.backend=vllm"])
    with pytest.raises(ConfigError, match=r"generation\.backend: vllm requested but vllm is not installed"):
        generate_cots(GenerateSpec.of(cfg), None, tmp_path / "out")
    assert not (tmp_path / "out" / "settings.json").exists()  # refused before anything was written


def test_cli_exit_2_names_the_key(no_vllm, tmp_path, capsys):
    from tract_dist.cli import main

    rc = main(["judge", "--model", "smollm2", "--mode", "rail", "--json",
               '{"instruction": "i", "response": "r", "criteria": "c", "score_descriptions": ["a","b","c","d","e"]}',
               "evaluation.backend=vllm"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "evaluation.backend: vllm requested but vllm is not installed" in err and "Traceback" not in err


def test_tensor_parallel_needs_vllm():
    cfg = load_config(None, ["model.name_or_path=x", "generation.backend=hf", "generation.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"generation\.tensor_parallel_size: 2 needs the vllm backend"):
        backend.choose_backend(cfg.generation, "generation", use_gpu=cfg.cluster.use_gpu)


def test_vllm_engine_arguments(tmp_path):
    """What the vLLM engine is asked for: the project's dtype rule, 1 GiB KV cache on CPU, TP on GPU, LoRA rank."""
    import json

    from tract_dist.runtime.engine import EngineSpec, VllmOptions
    from tract_dist.runtime.vllm_engine import engine_kwargs

    cpu = engine_kwargs(EngineSpec(backend="vllm", model_path="m"), gpu=False)
    assert cpu["dtype"] == "float32" and cpu["enforce_eager"] is True and cpu["kv_cache_memory_bytes"] == 1 << 30
    assert cpu["enable_prefix_caching"] is True and "enable_lora" not in cpu
    gpu = engine_kwargs(EngineSpec(backend="vllm", model_path="m", tensor_parallel_size=4,
                                   vllm=VllmOptions(max_model_len=4096)), gpu=True)
    assert gpu["dtype"] == "bfloat16" and gpu["enforce_eager"] is False and "kv_cache_memory_bytes" not in gpu
    assert gpu["tensor_parallel_size"] == 4 and gpu["distributed_executor_backend"] == "mp"
    assert gpu["max_model_len"] == 4096
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    base = tmp_path / "base"
    base.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 12}))
    lora = engine_kwargs(EngineSpec(backend="vllm", model_path=str(adapter)), gpu=True)
    assert lora["model"] == str(base) and lora["enable_lora"] is True and lora["max_lora_rank"] == 16
