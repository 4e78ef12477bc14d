"""What evaluation reads of a configuration: its sections, taken once by the caller (:meth:`EvaluateSpec.of`).

Evaluation never sees the whole :class:`~tract_dist.config.Config`: the judge's prompt layout (``data``), its
sampling and engine settings (``generation``), the benchmarks and inference mode (``evaluation``), the engine's
loading options (``model``), the replica pool (``cluster``) and MLflow (``tracking``) are all it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tract_dist.config import (ClusterSection, Config, DataSection, EvaluationSection, GenerationSection,
                               ModelSection, TrackingSection)


@dataclass(frozen=True)
class EvaluateSpec:
    """The sections evaluation reads, plus its default output folder."""

    evaluation: EvaluationSection
    generation: GenerationSection  # the judge's sampling, sequence length, replicas and vLLM engine settings
    data: DataSection  # the judge's prompt layout and score scale
    model: ModelSection  # loading options of the engine (and the default model)
    cluster: ClusterSection  # the replica pool
    tracking: TrackingSection
    default_output_dir: str  # evaluation.output_dir, else training.output_dir/evaluate

    @classmethod
    def of(cls, cfg: Config) -> EvaluateSpec:
        e = cfg.evaluation
        return cls(evaluation=e, generation=cfg.generation, data=cfg.data, model=cfg.model, cluster=cfg.cluster,
                   tracking=cfg.tracking,
                   default_output_dir=str(e.output_dir or Path(cfg.training.output_dir) / "evaluate"))
