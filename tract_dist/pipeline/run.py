"""Running (or planning) the TRACT pipeline: its folder and lock, the Ray start-up when a stage needs it, the
MLflow parent run, the engine's walk over :func:`~tract_dist.pipeline.tract.build_stages`, the report.

One invocation per pipeline at a time (a lock beside its folder). One MLflow parent run per pipeline, a child
run per stage and per benchmark. Each stage's progress is logged (``[pipeline] NAME: running`` ...) through
this module's logger; the entry point puts those lines on the console.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from tract_dist import console
from tract_dist.console import CONSOLE, TERMINAL_ERR
from tract_dist.config import Config
from tract_dist.fsutil import exclusive_lock
from tract_dist.identity import fingerprint
from tract_dist.pipeline.engine import StageEvent, StagePlan, StageState, check_selection, selector, walk
from tract_dist.pipeline.inputs import check_data_files, check_stage1_export
from tract_dist.pipeline.report import PipelineSummary, roll_up, write_results
from tract_dist.pipeline.tract import StageContext, build_stages, pipeline_storage
from tract_dist.runtime.ray_logging import session_logs
from tract_dist.tracking import log_artifact, log_params, start_run
from tract_dist.train.preflight import preflight


log = logging.getLogger(__name__)

SELECTION_KEY = "pipeline.stages"


def pipeline_dir(cfg: Config, name: str | None = None) -> tuple[str, Path]:
    """The pipeline's name (default ``pipeline-<method>-<config fingerprint>``) and folder."""
    name = name or f"pipeline-{cfg.pipeline.method}-{fingerprint(cfg)}"
    return name, Path(cfg.pipeline.output_dir).resolve() / name


def plan_pipeline(cfg: Config, *, name: str | None = None) -> dict[str, StagePlan]:
    """What a run of ``cfg`` would do, stage by stage in order, without running or locking anything."""
    preflight(cfg)
    name, pdir = pipeline_dir(cfg, name)
    stages = build_stages(cfg, pdir, name)
    state = StageState(pdir / "state.json")
    return walk(stages, state, selector(cfg.pipeline.stages, stages, SELECTION_KEY), key=SELECTION_KEY,
                dry=True).plan


def run_pipeline(cfg: Config, *, config_path: str | None = None, address: str | None = None,
                 name: str | None = None, fresh: bool = False) -> PipelineSummary:
    """Run (or resume) the pipeline configured by ``cfg``; returns what each stage did.

    A second invocation of the same pipeline while one runs fails at once, naming the holder (pid, host)."""
    preflight(cfg)
    check_data_files(cfg)
    check_stage1_export(cfg)
    name, pdir = pipeline_dir(cfg, name)
    with exclusive_lock(pdir, "pipeline"), console.quiet_run(pdir / "logs"):  # chatter to pdir/logs (console.py)
        return _run_locked(cfg, name, pdir, config_path=config_path, address=address, fresh=fresh)


def stage_progress(log_dir: Path) -> Callable[[StageEvent], None]:
    """The engine's events as the pipeline's console lines: a start and a finish line per stage (how long it
    took, where its output is); a failing stage's error and where the full output is (the error itself
    propagates as before)."""
    def report(e: StageEvent) -> None:
        if e.kind == "skipped":
            log.info("[pipeline] %s: up to date, skipped", e.stage, extra=CONSOLE)
        elif e.kind == "running":
            log.info("[pipeline] %s: running", e.stage, extra=CONSOLE)
        elif e.kind == "done":
            where = f" -> {e.paths[0]}" if e.paths else ""
            log.info("[pipeline] %s: done in %.0f s%s", e.stage, e.seconds, where, extra=CONSOLE)
        elif e.error is not None:
            stopped = isinstance(e.error, (KeyboardInterrupt, SystemExit))  # Ctrl-C, SIGTERM (cli.Terminated)
            what = "interrupted" if stopped else f"failed: {type(e.error).__name__}: {str(e.error)[:500]}"
            logs = "" if console.is_verbose() else f"; full log: {log_dir} (and {session_logs()} for Ray's own)"
            log.error("[pipeline] %s: %s after %.0f s%s", e.stage, what, e.seconds, logs, extra=TERMINAL_ERR)
    return report


def _run_locked(cfg: Config, name: str, pdir: Path, *, config_path: str | None, address: str | None,
                fresh: bool) -> PipelineSummary:
    from tract_dist.runtime.ray_cluster import init_ray_from_config
    from tract_dist.tracking.mlflow_run import artifact_root

    method = cfg.pipeline.method
    pdir.mkdir(parents=True, exist_ok=True)
    state = StageState(pdir / "state.json")
    summary = PipelineSummary(name, pdir, method)
    ctx = StageContext(address=address, fresh=fresh)
    stages = build_stages(cfg, pdir, name, ctx)
    selected = selector(cfg.pipeline.stages, stages, SELECTION_KEY)
    check_selection(stages, walk(stages, state, selected, key=SELECTION_KEY, dry=True).plan, selected,
                    SELECTION_KEY)
    if cfg.cluster.address or address or os.environ.get("RAY_ADDRESS") or _needs_ray(cfg):
        init_ray_from_config(cfg.cluster, address)
        from tract_dist.runtime.storage_check import check_shared_storage

        # Before any stage: on several nodes every folder a stage hands data through must be shared.
        check_shared_storage({"cluster.storage_path": pipeline_storage(cfg, pdir), "pipeline.output_dir": str(pdir)})

    tr = cfg.tracking
    model_tag = cfg.model.name_or_path
    with start_run(tr.tracking_uri, tr.experiment, name, enabled=tr.enabled, run_id=state.data.get("parent_run_id"),
                   tags={"stage": "pipeline", "method": method, "model": model_tag},
                   artifact_root=artifact_root(cfg.cluster, cfg.tracking)) as parent:
        if parent.run_id and parent.run_id != state.data.get("parent_run_id"):  # new, or the old one was deleted
            state.data["parent_run_id"] = parent.run_id
            state.save()
            log_params(parent, {**cfg.flat(), "pipeline.name": name})
            if config_path:
                log_artifact(parent, config_path, "config")
        summary.parent_run_id = parent.run_id
        summary.tracking_uri, summary.experiment_id = parent.tracking_uri, parent.experiment_id
        ctx.parent = parent
        ctx.tags.update(method=method, model=model_tag, pipeline=name)
        done = walk(stages, state, selected, key=SELECTION_KEY, progress=stage_progress(pdir / "logs"))
        summary.stages.update(done.records)
        roll_up(cfg, pdir, parent)
        write_results(pdir, stages, done.finished, parent)
        log_artifact(parent, state.path, "pipeline")
    return summary


def _needs_ray(cfg: Config) -> bool:
    """Ray is started only when a stage uses it (the GPU check machines have none)."""
    return cfg.cluster.launcher == "ray" or cfg.generation.ray or cfg.evaluation.ray
