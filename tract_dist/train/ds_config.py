"""The DeepSpeed JSON for a run, generated from the project config (or the user's, with "auto" filled in)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def build_ds_config(cfg: Any, world_size: int, *, bf16: bool, gpu: bool) -> dict[str, Any]:
    """ZeRO-3 (or the configured stage), AdamW without DeepSpeed's C++ ops, clipping, accumulation."""
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
        return ours
    path = Path(t.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"training.deepspeed_config: {path} not found")
    user = json.loads(path.read_text())
    return _fill_auto(user, ours)


def _fill_auto(user: Any, ours: Any) -> Any:
    """Replace every ``"auto"`` in the user's JSON with our value at the same key (as HF's integration does)."""
    if isinstance(user, dict):
        return {k: (ours.get(k) if v == "auto" and isinstance(ours, dict) else
                    _fill_auto(v, ours.get(k) if isinstance(ours, dict) else None)) for k, v in user.items()}
    return user
