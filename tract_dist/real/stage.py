"""The REAL stage from the driver's side: its config derived from the user's, then the training launcher.

``real.*`` says what the stage does; :func:`real_stage_config` turns it into the training settings the shared
launcher and recipe read (the model to start from, the rate, one optimizer step per round per update, the
accumulation that makes a rank's share of a round's samples one step), and checks that a round divides evenly
into ranks and micro-batches before any worker starts.
"""

from __future__ import annotations

from typing import Any

from tract_dist.config import Config, ConfigError


def real_stage_config(cfg: Config, init_model: str) -> Config:
    """The REAL stage's config: starts from ``init_model`` (an HF export), with LoRA (the adapter is handed to the
    engines each round) or full fine-tuning (every weight is, HF engines only; no KL term: its reference policy
    would be a second full model copy)."""
    from tract_dist.aliases import check_model_source

    r, t = cfg.real, cfg.training
    check_model_source(init_model, "pipeline.real_init (train-real --init)")
    if not cfg.model.lora.enabled:
        if r.beta > 0:
            raise ConfigError("real.beta: the KL term's reference policy is the LoRA adapter switched off; with "
                              "full fine-tuning it would be a second full model per worker (not built): set "
                              "real.beta=0 or model.lora.enabled=true")
        if r.rollout_backend == "vllm":
            raise ConfigError("real.rollout_backend: vLLM engines take the policy as a LoRA adapter each round; "
                              "full fine-tuning's weight hand-over is built for the hf engines: set "
                              "real.rollout_backend=hf or model.lora.enabled=true")
    world = cfg.cluster.num_workers
    n = r.prompts_per_step * r.k
    if n % (world * t.micro_batch_size):
        raise ConfigError(f"real: a round's {n} samples (real.prompts_per_step {r.prompts_per_step} x real.k {r.k}) "
                          f"must divide into cluster.num_workers {world} x training.micro_batch_size "
                          f"{t.micro_batch_size}")
    return cfg.derive(model={"name_or_path": init_model},
                      training={"learning_rate": r.learning_rate, "max_steps": r.steps,
                                "gradient_accumulation_steps": n // (world * t.micro_batch_size)},
                      data={"use_cot": False})  # the stage reads prompts and gold scores; a CoT is not needed


def run_real(cfg: Config, init_model: str, **kwargs: Any) -> Any:
    """Run (or resume) the REAL stage from ``init_model``; ``kwargs`` as :func:`tract_dist.train.trainer.run_training`."""
    from tract_dist.train.trainer import run_training

    kwargs.setdefault("stage", "train_real")
    return run_training(real_stage_config(cfg, init_model), recipe="real", **kwargs)
