"""The DeepSpeed JSON for a run, generated from the project config (or the user's, with "auto" filled in)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def build_ds_config(cfg: Any, world_size: int, *, bf16: bool, gpu: bool,
                    load_universal: bool = False) -> dict[str, Any]:
    """ZeRO-3 (or the configured stage), AdamW without DeepSpeed's C++ ops, clipping, accumulation.

    ``load_universal``: the engine will resume from a universal checkpoint (another world size wrote the run's
    checkpoint). The accumulation values only keep DeepSpeed's bookkeeping consistent: the recipe sets the
    boundary of every step itself (packed steps have as many micro-batches as their tokens need)."""
    t = cfg.training
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": t.zero_stage,
            "overlap_comm": gpu,
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8,
                       "weight_decay": t.weight_decay, "torch_adam": True},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not t.deepspeed_config:
        return _with_universal(ours, load_universal)
    path = Path(t.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"training.deepspeed_config: {path} not found")
    user = json.loads(path.read_text())
    return _with_universal(_fill_auto(user, ours), load_universal)


def _with_universal(ds: dict[str, Any], load_universal: bool) -> dict[str, Any]:
    if load_universal:
        ds = {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}
    return ds


def _fill_auto(user: Any, ours: Any) -> Any:
    """Replace every ``"auto"`` in the user's JSON with our value at the same key (as HF's integration does)."""
    if isinstance(user, dict):
        return {k: (ours.get(k) if v == "auto" and isinstance(ours, dict) else
                    _fill_auto(v, ours.get(k) if isinstance(ours, dict) else None)) for k, v in user.items()}
    return user
