"""Thin MLflow helpers: one place that knows the tracking URI, experiment layout and run status rules.

Why not call mlflow directly everywhere: runs must be created in the driver (an experiment created in a Ray
worker puts artifacts in Ray's temporary session folder), workers log to an explicit run id from rank 0
only, and a crash must leave the run FAILED (an interrupt KILLED) rather than RUNNING. ``enabled=False`` turns
every call into a no-op so library code needs no ``if tracking`` branches.

Tracking observes; it never fails the work: every call catches the store's errors and warns (counted in
:data:`STATS`), metrics logged during an outage are buffered and retried with backoff, then dropped with a
counted warning; credentials in tracking URIs are redacted from params, tags and messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from tract_dist.console import CONSOLE_ERR

if TYPE_CHECKING:
    from tract_dist.config import ClusterSection, TrackingSection

log = logging.getLogger(__name__)

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


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""MLflow 3's experiment type. Unset, the UI guesses and, for an experiment without traces, opens on the
GenAI overview ("Traces: 0") instead of the runs table."""
MODEL_TRAINING_KIND = "custom_model_development"
"""The kind the UI calls "Machine learning" (the other one it offers is ``genai_development``): it opens on
the runs, with their metrics, datasets and models."""


def artifact_root(cluster: "ClusterSection", tracking: "TrackingSection") -> str | None:
    """Where a new experiment keeps its artifacts when ``cluster.storage_path`` is a URI:
    ``<storage_path>/mlflow/<experiment>`` (MLflow writes s3:// through boto3, gs:// through google-cloud-storage,
    with the driver's credentials from its environment); None otherwise (the store's own default)."""
    from tract_dist.storage import mirror_of

    return mirror_of(cluster.storage_path, "mlflow", tracking.experiment)


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """Experiment id, created as a model-training experiment with an explicit artifact location:
    ``artifact_location`` when given (:func:`artifact_root`), else next to a local store (an existing
    experiment keeps its location, which MLflow cannot change: a local one where a URI is asked for is logged; an
    existing one without a kind gets it; a kind someone chose is kept)."""
    # A client bound to the URI, not mlflow.set_tracking_uri: that also sets MLFLOW_TRACKING_URI for the
    # whole process, which would then override every later config's URI (resolve_uri lets the variable win).
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        from tract_dist.storage import is_uri

        if artifact_location and is_uri(artifact_location) and not is_uri(exp.artifact_location):
            import logging

            logging.getLogger(__name__).warning(
                "MLflow experiment %s keeps its artifacts in %s (set when it was created), not in %s; use another "
                "tracking.experiment to have them under cluster.storage_path", name, exp.artifact_location,
                artifact_location)
        return exp.experiment_id
    if artifact_location is None and tracking_uri.startswith("sqlite:///"):
        artifact_location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts" / name).resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location,
                                    tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})


UI_DEFAULT = "http://127.0.0.1:5000"  # where ``mlflow ui`` serves a local store by default
RUNS_VIEW = "runs?workflowType=machine_learning"
"""The runs table. MLflow 3.17's UI ignores the experiment kind and opens an experiment on its GenAI overview
(traces) until one clicks "Model training"; this query opens the runs table directly."""


def runs_url(tracking_uri: str, experiment_id: str, view: str | None = None) -> tuple[str, str | None]:
    """(URL of the experiment's runs table, the command that serves it or None): a tracking server serves its
    UI at its own address; a local store (sqlite, folder) needs ``mlflow ui`` first. ``view``: a shared view's
    key (``rollup.publish_runs_view``: the headline columns shown)."""
    uri = resolve_uri(tracking_uri)
    path = f"#/experiments/{experiment_id}/{RUNS_VIEW}" + (f"&viewStateShareKey={view}" if view else "")
    if uri.startswith(("http://", "https://")):
        return f"{redact_uri(uri).rstrip('/')}/{path}", None
    return f"{UI_DEFAULT}/{path}", f"mlflow ui --backend-store-uri {redact_uri(uri)}"


# A tracking server that is down must cost a training step no more than a short wait: MLflow's own defaults
# retry a request 7 times with exponential backoff (minutes). Users who set these variables keep theirs.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_MAX_PENDING = 20_000  # metric values buffered per run during an outage; older ones are dropped (counted)
_MAX_FAILED_FLUSHES = 30  # then the buffer is given up on (counted), and new values start a fresh one
_BATCH = 1000  # MLflow's cap on metrics per log_batch


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    for k, v in _HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    return MlflowClient(uri)


def _warn(msg: str) -> None:
    log.warning(f"[tracking] warning: {msg}", extra=CONSOLE_ERR)


@dataclass
class _Outbox:
    """Metric values of one run not yet accepted by the tracking store."""

    pending: list[Any] = field(default_factory=list)
    failures: int = 0  # consecutive failed flushes
    next_try: float = 0.0
    dropped: int = 0


@dataclass
class TrackingStats:
    """What tracking could not do in this process (tests and the end-of-run summary read it)."""

    dropped_metrics: int = 0
    failed_calls: int = 0
    warnings: list[str] = field(default_factory=list)


STATS = TrackingStats()
_OUTBOXES: dict[tuple[str, str], _Outbox] = {}


def _failed(what: str, e: BaseException) -> None:
    STATS.failed_calls += 1
    msg = f"MLflow {what} failed ({type(e).__name__}: {str(e)[:300]}); the run goes on without it"
    STATS.warnings.append(msg)
    if STATS.failed_calls <= 5 or STATS.failed_calls % 50 == 0:
        _warn(msg + (f" [{STATS.failed_calls} tracking failures so far]" if STATS.failed_calls > 5 else ""))


def _missing_run(e: BaseException) -> bool:
    code = getattr(e, "error_code", "") or ""
    return "RESOURCE_DOES_NOT_EXIST" in str(code) or "RESOURCE_DOES_NOT_EXIST" in str(e)


@contextlib.contextmanager
def start_run(tracking_uri: str, experiment: str, run_name: str | None = None, *, enabled: bool = True,
              parent: RunHandle | None = None, tags: dict[str, str] | None = None,
              run_id: str | None = None, artifact_root: str | None = None) -> Iterator[RunHandle]:
    """Create (or reopen ``run_id``) a run; ends it FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (an error).
    ``artifact_root``: the artifact location of the experiment if this call creates it (:func:`artifact_root`).

    Tracking never fails the work it observes: a store that cannot be reached gives a warning and a disabled
    handle (the body runs untracked); a ``run_id`` the store no longer has starts a new run, with a warning."""
    if not enabled:
        yield RunHandle(tracking_uri, None)
        return
    uri = resolve_uri(tracking_uri)
    try:
        exp_id = ensure_experiment(uri, experiment, artifact_root)
        client = _client(uri)
        if run_id is not None:
            try:
                gone = client.get_run(run_id).info.lifecycle_stage == "deleted"
            except Exception as e:  # noqa: BLE001
                if not _missing_run(e):
                    raise
                gone = True
            if gone:
                _warn(f"MLflow run {run_id} no longer exists in {redact_uri(uri)} (deleted?); starting a new run")
                run_id = None
            else:
                client.update_run(run_id, status="RUNNING")
        if run_id is None:
            all_tags = {**source_tags(), **(tags or {})}
            if parent is not None and parent.run_id:
                all_tags["mlflow.parentRunId"] = parent.run_id
            run_id = client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
    except Exception as e:  # noqa: BLE001 - tracking is an observer
        _failed(f"start of run {run_name!r} at {redact_uri(uri)}", e)
        yield RunHandle(uri, None)
        return
    handle = RunHandle(uri, run_id, exp_id)
    try:
        yield handle
    except (KeyboardInterrupt, SystemExit) as e:
        flush(handle)
        status = "FINISHED" if isinstance(e, SystemExit) and e.code in (0, None) else "KILLED"
        _terminate(handle, status)
        raise
    except BaseException:
        flush(handle)
        _terminate(handle, "FAILED")
        raise
    flush(handle)
    _terminate(handle, "FINISHED")


_SOURCE: dict[str, str] = {}  # set_source: what started this process, for the runs table's Source column


def set_source(name: str) -> None:
    """Name what started this process (the CLI: ``tract-dist pipeline configs/quickstart.yaml``) as the Source of
    the runs it creates; otherwise the script's name is used, as MLflow's fluent API does."""
    _SOURCE["name"] = name


def source_tags() -> dict[str, str]:
    """The Source and User columns of the runs table (``mlflow.source.*``, ``mlflow.user``): ``MlflowClient``
    runs get none, only the fluent API resolves them, and this module never uses the fluent API."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name for this uid (containers)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    name = _SOURCE.get("name") or (Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python")
    return {"mlflow.source.name": redact_text(name), "mlflow.source.type": "LOCAL", "mlflow.user": user}


def _terminate(handle: RunHandle, status: str) -> None:
    try:
        _client(handle.tracking_uri).set_terminated(handle.run_id, status=status)
    except Exception as e:  # noqa: BLE001
        _failed(f"ending run {handle.run_id} as {status}", e)


def resume_run(handle: RunHandle) -> RunHandle:
    """Mark an existing run RUNNING again (a resumed stage logs into the run it started)."""
    if handle.enabled:
        try:
            _client(handle.tracking_uri).update_run(handle.run_id, status="RUNNING")
        except Exception as e:  # noqa: BLE001
            _failed(f"reopening run {handle.run_id}", e)
    return handle


def _send(handle: RunHandle, box: _Outbox) -> None:
    client = _client(handle.tracking_uri)
    while box.pending:
        client.log_batch(handle.run_id, metrics=box.pending[:_BATCH])
        del box.pending[:_BATCH]


def _drop(box: _Outbox, n: int, why: str) -> None:
    if n <= 0:
        return
    del box.pending[:n]
    box.dropped += n
    STATS.dropped_metrics += n
    msg = f"dropped {n} buffered metric values ({why}); {STATS.dropped_metrics} dropped in this process so far"
    STATS.warnings.append(msg)
    _warn(msg)


def log_metrics(handle: RunHandle, metrics: dict[str, float], step: int | None = None, *,
                model_id: str | None = None, dataset: tuple[str, str] | None = None) -> None:
    """Log metric values; during a tracking outage they are buffered and retried with backoff (a failed
    attempt costs the caller one short request), then dropped with a counted warning.

    ``model_id`` (an MLflow 3 logged model) and ``dataset`` ((name, digest) of a dataset input of the run) file
    the values under that model too: the Models tab shows them per model and dataset."""
    if not handle.enabled or not metrics:
        return
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    name, digest = dataset or (None, None)
    box = _OUTBOXES.setdefault((handle.tracking_uri, handle.run_id), _Outbox())
    box.pending += [Metric(k, float(v), ts, step or 0, model_id=model_id, dataset_name=name, dataset_digest=digest)
                    for k, v in metrics.items() if v is not None]
    if len(box.pending) > _MAX_PENDING:
        _drop(box, len(box.pending) - _MAX_PENDING, f"more than {_MAX_PENDING} waiting for the tracking store")
    now = time.monotonic()
    if now < box.next_try:
        return
    _try_send(handle, box, now)


def _try_send(handle: RunHandle, box: _Outbox, now: float) -> bool:
    waiting = len(box.pending)
    try:
        _send(handle, box)
    except Exception as e:  # noqa: BLE001 - buffered, retried later
        box.failures += 1
        box.next_try = now + min(2.0 * 2 ** box.failures, 120.0)
        if box.failures == 1:
            _failed(f"logging metrics to run {handle.run_id}", e)
            _warn(f"{len(box.pending)} metric values are buffered and will be retried")
        if box.failures >= _MAX_FAILED_FLUSHES:
            _drop(box, len(box.pending), f"{box.failures} failed attempts to reach the tracking store")
            box.failures = 0
        return False
    if box.failures:
        _warn(f"tracking store reachable again; {waiting} buffered metric values sent")
    box.failures = 0
    box.next_try = 0.0
    return True


def flush(handle: RunHandle) -> None:
    """Send what is buffered for this run now (end of a run); what still cannot be sent is dropped, counted."""
    if not handle.enabled:
        return
    import time

    box = _OUTBOXES.get((handle.tracking_uri, handle.run_id))
    if box is None or not box.pending:
        return
    if not _try_send(handle, box, time.monotonic()):
        _drop(box, len(box.pending), "the tracking store is unreachable at the end of the run")


def log_params(handle: RunHandle, params: dict[str, Any]) -> None:
    if not handle.enabled or not params:
        return
    from mlflow.entities import Param

    items = [Param(k, redact_text(str(v))[:_MAX_PARAM_LEN]) for k, v in params.items()]
    try:
        client = _client(handle.tracking_uri)
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            client.log_batch(handle.run_id, params=items[i:i + 100])
    except Exception as e:  # noqa: BLE001
        _failed(f"logging {len(items)} params", e)


def log_artifact(handle: RunHandle, path: str | Path, artifact_path: str | None = None) -> None:
    if not handle.enabled:
        return
    try:
        _client(handle.tracking_uri).log_artifact(handle.run_id, str(path), artifact_path)
    except Exception as e:  # noqa: BLE001
        _failed(f"uploading artifact {path}", e)


def set_tags(handle: RunHandle, tags: dict[str, str]) -> None:
    if not handle.enabled:
        return
    try:
        client = _client(handle.tracking_uri)
        for k, v in tags.items():
            client.set_tag(handle.run_id, k, redact_text(str(v)))
    except Exception as e:  # noqa: BLE001
        _failed("setting tags", e)


_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s:]*(?::[^/@\s]*)?)@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|access_token|password|passwd|pwd|secret|api_key|apikey|key|sig|"
                           r"signature|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&\s'\"]+")


def redact_uri(uri: str) -> str:
    """``scheme://user:password@host/...`` -> ``scheme://***@host/...``; secret query values -> ``***``."""
    return redact_text(uri)


def redact_text(text: str) -> str:
    """Every URL credential in ``text`` replaced by ``***`` (user info, token/password/signature queries)."""
    text = _CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m.group(1)}***", text)
