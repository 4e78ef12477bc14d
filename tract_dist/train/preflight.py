"""What the trainer checks in the driver before any worker starts or a model downloads: the model source, its
tokenizer, the loss choice. The pipeline and ``train`` run it first, so a bad setting fails at once with a
:class:`~tract_dist.config.ConfigError` naming its key."""

from __future__ import annotations

from tract_dist.aliases import check_model_source, is_random_model
from tract_dist.config import Config, ConfigError


def preflight(cfg: Config) -> None:
    """Fail before any worker starts on what can be checked here (model source, tokenizer, loss choice)."""
    name = cfg.model.name_or_path
    check_model_source(name)
    if is_random_model(name) and not cfg.model.tokenizer:
        raise ConfigError(f"model.tokenizer: required with model.name_or_path={name} (e.g. smollm2, llama3)")
    if cfg.loss.impl not in ("fused", "reference"):
        raise ConfigError(f"loss.impl: unknown {cfg.loss.impl}")
