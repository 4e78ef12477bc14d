"""MLflow tracking: runs created in the driver, explicit run ids handed to workers, failures recorded."""

from tract_dist.tracking.mlflow_run import (
    RunHandle,
    ensure_experiment,
    log_artifact,
    log_metrics,
    log_params,
    resume_run,
    set_tags,
    start_run,
)

__all__ = ["RunHandle", "ensure_experiment", "log_artifact", "log_metrics", "log_params", "resume_run",
           "set_tags", "start_run"]
