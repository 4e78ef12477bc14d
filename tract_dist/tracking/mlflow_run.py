"""Thin MLflow helpers: one place that knows the tracking URI, experiment layout and run status rules.

Why not call mlflow directly everywhere: runs must be created in the driver (an experiment created in a Ray
worker puts artifacts in Ray's temporary session folder), workers log to an explicit run id from rank 0
only, and a crash must leave the run FAILED rather than RUNNING. ``enabled=False`` turns every call into a
no-op so library code needs no ``if tracking`` branches.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


@dataclass(frozen=True)
class RunHandle:
    """What a worker needs to log into a run created elsewhere (picklable)."""

    tracking_uri: str
    run_id: str | None  # None: tracking disabled
    experiment_id: str | None = None

    @property
    def enabled(self) -> bool:
        return self.run_id is not None


def resolve_uri(uri: str) -> str:
    """``MLFLOW_TRACKING_URI`` wins over the config; a relative sqlite path is made absolute (workers' cwd differs)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Experiment id, created with an explicit artifact location next to a local store."""
    from mlflow.tracking import MlflowClient

    # A client bound to the URI, not mlflow.set_tracking_uri: that also sets MLFLOW_TRACKING_URI for the
    # whole process, which would then override every later config's URI (resolve_uri lets the variable win).
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        artifact_location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts" / name).resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


@contextlib.contextmanager
def start_run(tracking_uri: str, experiment: str, run_name: str | None = None, *, enabled: bool = True,
              parent: RunHandle | None = None, tags: dict[str, str] | None = None,
              run_id: str | None = None) -> Iterator[RunHandle]:
    """Create (or reopen ``run_id``) a run; ends it FINISHED, or FAILED if the body raises."""
    if not enabled:
        yield RunHandle(tracking_uri, None)
        return
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(tracking_uri)
    exp_id = ensure_experiment(uri, experiment)
    client = MlflowClient(uri)
    if run_id is None:
        all_tags = dict(tags or {})
        if parent is not None and parent.run_id:
            all_tags["mlflow.parentRunId"] = parent.run_id
        run_id = client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
    handle = RunHandle(uri, run_id, exp_id)
    try:
        yield handle
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def resume_run(handle: RunHandle) -> RunHandle:
    """Mark an existing run RUNNING again (a resumed stage logs into the run it started)."""
    if handle.enabled:
        from mlflow.tracking import MlflowClient

        MlflowClient(handle.tracking_uri).update_run(handle.run_id, status="RUNNING")
    return handle


def log_metrics(handle: RunHandle, metrics: dict[str, float], step: int | None = None) -> None:
    if not handle.enabled or not metrics:
        return
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
    MlflowClient(handle.tracking_uri).log_batch(handle.run_id, metrics=batch)


def log_params(handle: RunHandle, params: dict[str, Any]) -> None:
    if not handle.enabled or not params:
        return
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
    client = MlflowClient(handle.tracking_uri)
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(handle.run_id, params=items[i:i + 100])


def log_artifact(handle: RunHandle, path: str | Path, artifact_path: str | None = None) -> None:
    if not handle.enabled:
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(handle.tracking_uri).log_artifact(handle.run_id, str(path), artifact_path)


def set_tags(handle: RunHandle, tags: dict[str, str]) -> None:
    if not handle.enabled:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(handle.tracking_uri)
    for k, v in tags.items():
        client.set_tag(handle.run_id, k, v)
