"""What CoT generation reads of a configuration: its sections, taken once by the caller (:meth:`GenerateSpec.of`).

Generation never sees the whole :class:`~tract_dist.config.Config`: the sections below are all it reads, so a
change elsewhere in the config (training, loss, the pipeline) cannot reach it, and a reader of
:mod:`tract_dist.generate.pipeline` finds every setting it uses here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tract_dist.config import (ClusterSection, Config, DataSection, GenerationSection, ModelSection,
                               TrackingSection)


@dataclass(frozen=True)
class GenerateSpec:
    """The sections generation reads, plus the two values it derives from the rest of the config."""

    generation: GenerationSection
    data: DataSection  # the training prompts and their layout
    model: ModelSection  # loading options of the engine (and the default model)
    cluster: ClusterSection  # the replica pool
    tracking: TrackingSection
    default_output_dir: str  # generation.output_dir, else training.output_dir/generate
    rail_normalize: bool | None  # evaluation.rail_normalize: how the stage-1 judge reads ŷ (None: its export's)

    @classmethod
    def of(cls, cfg: Config) -> GenerateSpec:
        g = cfg.generation
        return cls(generation=g, data=cfg.data, model=cfg.model, cluster=cfg.cluster, tracking=cfg.tracking,
                   default_output_dir=str(g.output_dir or Path(cfg.training.output_dir) / "generate"),
                   rail_normalize=cfg.evaluation.rail_normalize)

    @property
    def max_length(self) -> int:
        """Tokens of an inference sequence: ``generation.max_length``, else the training cutoff ``data.max_length``."""
        return inference_max_length(self.generation, self.data)


def inference_max_length(generation: GenerationSection, data: DataSection) -> int:
    """Tokens of an inference sequence (generation and judging): ``generation.max_length``, else the training
    cutoff ``data.max_length``."""
    return generation.max_length or data.max_length
