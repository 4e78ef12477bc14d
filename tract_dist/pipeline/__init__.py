"""The TRACT pipeline: stage 1 -> CoT generation -> stage-2 data -> stage 2 -> evaluation, resumable.

- :mod:`~tract_dist.pipeline.engine`: a generic engine for resumable stages (fingerprints, ``state.json``,
  selection, progress events); it knows no TRACT stage and prints nothing.
- :mod:`~tract_dist.pipeline.tract`: the TRACT stage list (:func:`build_stages`) and each stage's body.
- :mod:`~tract_dist.pipeline.methods`: the methods and the inference modes they are evaluated in.
- :mod:`~tract_dist.pipeline.inputs`: what the pipeline reads, checked before any stage.
- :mod:`~tract_dist.pipeline.run`: :func:`run_pipeline` and :func:`plan_pipeline` (lock, Ray, MLflow parent run).
- :mod:`~tract_dist.pipeline.report`: the summary table, ``results.json``, the MLflow roll-up.
- :mod:`~tract_dist.pipeline.commands`: ``tract-dist pipeline``, ``compare``, ``submit``, ``job``.

The names below are importable from the package itself; they load on first use, so importing a light submodule
(``methods``, ``inputs``) does not import MLflow or the trainer.
"""

from __future__ import annotations

from tract_dist.lazy import lazy_exports

_EXPORTS = {
    "run_pipeline": "run", "plan_pipeline": "run", "pipeline_dir": "run",
    "build_stages": "tract", "stage_config": "tract", "pipeline_storage": "tract", "StageContext": "tract",
    "TrainOutputs": "tract", "GenerateOutputs": "tract", "Stage2DataOutputs": "tract", "EvalOutputs": "tract",
    "Stage": "engine", "StageOutputs": "engine", "StagePlan": "engine", "StageEvent": "engine",
    "EVAL_MODES": "methods", "PipelineSummary": "report",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
