"""tract-dist: TRACT (two-stage regression-aware CoT fine-tuning) for LLM judges on Ray + DeepSpeed."""

__version__ = "0.1.0"
