"""Export a trained model as a Hugging Face directory, consolidated from the ZeRO-3 shards.

The strategy gathers the whole state dict onto rank 0 (DeepSpeed's own all-gather of a partitioned model, a
collective: :meth:`tract_dist.train.strategy.DeepSpeedStrategy.consolidated_state_dict`). Rank 0 then writes
safetensors + config + tokenizer into a temporary folder (named after its writer, ``fsutil.temp_path``), fsyncs it and renames it into place
(``fsutil.publish_dir``), so neither a crash nor a power loss leaves a half-written export. For LoRA the
adapter is written with PEFT, and the merged model (W + alpha/r * B @ A) beside it when asked. Each folder gets
a manifest (every file's size and SHA-256) that a node fetching it from shared storage checks.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tract_dist.export_record import write_export_record
from tract_dist.fsutil import is_stale_temp, publish_dir, temp_path
from tract_dist.storage import write_manifest

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import GenerationConfig, PretrainedConfig

    from tract_dist.config import Config


def save_hf_dir(state_dict: dict[str, torch.Tensor], config: PretrainedConfig, tokenizer: Any, out: Path,
                generation_config: GenerationConfig | None = None) -> None:
    from safetensors.torch import save_file

    from tract_dist.models.loading import drop_gguf_quantization

    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    drop_gguf_quantization(config)  # a model trained from a GGUF seed (the smollm2 alias) holds plain weights
    if getattr(config, "tie_word_embeddings", False):
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    if not getattr(config, "architectures", None):
        # A config built in code (tiny/random seeds, a GGUF seed) names no class; model.save_pretrained would
        # write it, and readers that pick the class from it (vLLM, MLflow's transformers flavour) need it.
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        try:
            config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__]
        except KeyError:  # not an auto-mapped causal LM: left as it was
            pass
    # Clone so tensors never share storage (safetensors refuses shared tensors).
    save_file({k: v.clone() for k, v in state_dict.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(out)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def merge_lora(state_dict: dict[str, torch.Tensor], peft_config: LoraConfig,
               adapter: str = "default") -> dict[str, torch.Tensor]:
    """Base-model state dict with every LoRA delta folded in: W + (alpha / r) * B @ A."""
    if getattr(peft_config, "use_rslora", False) or getattr(peft_config, "use_dora", False):
        raise NotImplementedError("merging rsLoRA/DoRA adapters is not supported; export the adapter only")
    scaling = peft_config.lora_alpha / peft_config.r
    merged: dict[str, torch.Tensor] = {}
    base_prefix = "base_model.model."
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        name = key[len(base_prefix):] if key.startswith(base_prefix) else key
        name = name.replace(".base_layer.", ".")
        if key.endswith(".base_layer.weight"):
            stem = key[: -len(".base_layer.weight")]
            a = state_dict[f"{stem}.lora_A.{adapter}.weight"].float()
            b = state_dict[f"{stem}.lora_B.{adapter}.weight"].float()
            value = (value.float() + scaling * (b @ a)).to(value.dtype)
        merged[name] = value
    return merged


def export_model(sd: dict[str, torch.Tensor] | None, model: Any, tokenizer: Any, cfg: Config, out_dir: Path,
                 rank: int) -> None:
    """Write ``out_dir/model`` (full HF model; merged for LoRA when ``merge_on_export``) and, for LoRA,
    ``out_dir/adapter`` on rank 0, from ``sd``: the whole model's state dict rank 0 received
    (:meth:`~tract_dist.train.strategy.DeepSpeedStrategy.consolidated_state_dict`; None on the other ranks)."""
    if rank != 0:
        return
    assert sd is not None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    tmp = temp_path(out_dir)  # named after this writer, so a clean-up never removes a live writer's folder
    try:
        _write_export(sd, model, tokenizer, cfg, tmp)
        publish_dir(tmp, out_dir)  # fsync'd before the rename: a published export is never half on disk
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed export (ENOSPC, a kill signal) leaves no half folder
        raise


def _remove_stale_temps(out_dir: Path) -> None:
    """Temporary export folders left by dead writers (and the older fixed ``NAME.tmp``)."""
    shutil.rmtree(out_dir.with_name(out_dir.name + ".tmp"), ignore_errors=True)
    for old in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        if is_stale_temp(old):
            shutil.rmtree(old, ignore_errors=True)


def _write_export(sd: dict[str, torch.Tensor], model: Any, tokenizer: Any, cfg: Config, tmp: Path) -> None:
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        from peft import get_peft_model_state_dict

        pc = peft_config["default"]
        adapter_sd = get_peft_model_state_dict(model, state_dict=sd)
        model.save_pretrained(str(tmp / "adapter"), state_dict=adapter_sd)
        tokenizer.save_pretrained(tmp / "adapter")
        base = model.get_base_model()
        if cfg.model.lora.merge_on_export:
            save_hf_dir(merge_lora(sd, pc), base.config, tokenizer, tmp / "model",
                        getattr(base, "generation_config", None))
    else:
        save_hf_dir(sd, model.config, tokenizer, tmp / "model", getattr(model, "generation_config", None))
    write_export_record(tmp, cfg.loss)  # the loss's score read-out, which evaluation.rail_normalize unset follows
    for name in ("model", "adapter"):  # last: each loadable folder's content check (sizes + SHA-256), which a
        if (tmp / name).is_dir():       # node fetching it from shared storage verifies (tract_dist/storage.py)
            write_manifest(tmp / name)
