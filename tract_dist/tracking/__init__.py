"""MLflow tracking: runs created in the driver, explicit run ids handed to workers, failures recorded."""

from tract_dist.tracking.mlflow_run import (
    RunHandle,
    STATS,
    ensure_experiment,
    flush,
    log_artifact,
    log_metrics,
    log_params,
    redact_text,
    redact_uri,
    resume_run,
    set_tags,
    start_run,
)

__all__ = ["STATS", "RunHandle", "ensure_experiment", "flush", "log_artifact", "log_metrics", "log_params",
           "redact_text", "redact_uri", "resume_run", "set_tags", "start_run"]
