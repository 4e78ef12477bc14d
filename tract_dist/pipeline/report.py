"""What a pipeline run reports when it ends: the summary table of its stages, ``results.json`` (every
evaluation's metrics) and the roll-up of the stages' results onto the pipeline's MLflow run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tract_dist.config import Config
from tract_dist.fsutil import atomic_write_json
from tract_dist.pipeline.engine import Finished, Stage
from tract_dist.pipeline.tract import EvalOutputs, stage_config
from tract_dist.tracking import RunHandle, log_artifact


@dataclass
class PipelineSummary:
    name: str
    directory: Path
    method: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None

    def render(self) -> str:
        lines = [f"[pipeline] {self.name} ({self.method}) in {self.directory}"]
        for name, rec in self.stages.items():
            status = rec.get("status", "?")
            lines.append(f"  {name:<32} {status:<8} {rec.get('outputs', {}).get('summary', '')}")
        if self.parent_run_id:
            lines.append(f"  MLflow parent run: {self.parent_run_id}")
        if self.tracking_uri and self.experiment_id:
            from tract_dist.tracking.mlflow_run import runs_url
            from tract_dist.tracking.rollup import RUNS_VIEW_KEY

            url, serve = runs_url(self.tracking_uri, self.experiment_id, RUNS_VIEW_KEY)
            lines.append(f"  MLflow runs: {url}" + (f"  (after: {serve})" if serve else ""))
        return "\n".join(lines)


def write_results(pdir: Path, stages: list[Stage[Any]], finished: Finished, parent: RunHandle) -> None:
    """``results.json``: every finished evaluation's outputs by stage name; logged to the pipeline's run."""
    results = {st.name: finished.out(st).record() for st in stages if st.outputs is EvalOutputs and st in finished}
    atomic_write_json(pdir / "results.json", results)
    log_artifact(parent, pdir / "results.json", "pipeline")


def roll_up(cfg: Config, pdir: Path, parent: RunHandle) -> None:
    """The stages' headline results, datasets and charts onto the pipeline's run (tracking.rollup), with the
    settings that tell methods apart as the method's stages ran them (ce_cot: lambda 0, CE on the score)."""
    from tract_dist.tracking.rollup import roll_up as roll_up_runs

    run_cfg = stage_config(cfg, pdir)
    roll_up_runs(parent, {"method": cfg.pipeline.method, "model": cfg.model.name_or_path, "lam": run_cfg.loss.lam,
                          "ce_on_score_token": run_cfg.loss.ce_on_score_token, "use_cot": run_cfg.data.use_cot})
