"""The pipeline's MLflow run as the row a user compares: its stages' headline results rolled up onto it.

The runs table and its compare view show a run's own metrics and params, and every Pearson of a pipeline
lives in a child run (one per benchmark evaluation), so two pipelines could not be put side by side without
opening each child. :func:`roll_up` copies, from the children of the pipeline's run:

- metrics ``<stage>.<benchmark>.<inference>.<metric>`` for :data:`HEADLINE` (the overall values the
  evaluation run logged as ``<benchmark>.<metric>``);
- params: the given ones (method, model, λ, ...) and, from the training runs, ``<stage>.train_steps`` and
  ``<stage>.train_examples``, from the evaluation runs ``rail_normalize`` (as the judge read ŷ);
- every dataset input of the children (training data, stage-2 data, benchmarks);
- image artifacts under ``charts/``: each evaluation's scatter plot and a bar chart of Pearson per benchmark
  per stage;
- the experiment's runs view (:func:`publish_runs_view`): the runs table with the headline Pearson columns
  shown, where MLflow's UI would otherwise list them among every config key and per-category metric.

When a stage ran more than once (a crash, then a rerun) the latest FINISHED run of it wins, as in
``tract-dist compare``. MLflow params cannot change: one already logged with another value is kept and named
in a warning. Tracking observes: a failure is a counted warning, never the pipeline's.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tract_dist.tracking.datasets import copy_dataset_inputs
from tract_dist.tracking.mlflow_run import RunHandle, _client, _failed, _warn, log_metrics, log_params

HEADLINE = ("pearson", "spearman", "kendall", "rmse", "n", "failed", "accuracy", "position_agreement",
            "accuracy_debiased")
"""The overall metrics shown per stage, benchmark and inference mode (n: scored, failed: no usable score).
Absolute benchmarks report the correlations and RMSE, relative ones (pairs) accuracy and the position-swap
agreement (``evaluate.pairwise``); a metric a benchmark lacks is left out."""
STAGE_TAG = "model_stage"  # stage1 / stage2: set on the pipeline's training and evaluation runs
CHARTS = "charts"


@dataclass
class RollUp:
    """What :func:`roll_up` put on the pipeline's run."""

    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    datasets: int = 0
    charts: list[str] = field(default_factory=list)


def _latest(runs: list[Any], key: Any) -> dict[Any, Any]:
    """The latest FINISHED run per ``key(run)`` (runs sorted by start time; None keys skipped)."""
    out: dict[Any, Any] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        k = key(r)
        if k is not None and r.info.status == "FINISHED":
            out[k] = r
    return out


def _eval_key(run: Any) -> tuple[str, str, str] | None:
    t = run.data.tags
    if t.get("stage") != "evaluate" or not all(t.get(k) for k in (STAGE_TAG, "benchmark", "inference")):
        return None
    return t[STAGE_TAG], t["benchmark"], t["inference"]


def _train_key(run: Any) -> str | None:
    t = run.data.tags
    return t.get(STAGE_TAG) if t.get("stage") == "train" else None


def headline_metrics(evals: dict[tuple[str, str, str], Any]) -> dict[str, float]:
    """``<stage>.<benchmark>.<inference>.<metric>`` from each evaluation run's ``<benchmark>.<metric>``."""
    out: dict[str, float] = {}
    for (stage, bench, mode), run in sorted(evals.items()):
        for m in HEADLINE:
            v = run.data.metrics.get(f"{bench}.{m}")
            if v is not None:
                out[f"{stage}.{bench}.{mode}.{m}"] = v
    return out


def derived_params(trains: dict[str, Any], evals: dict[tuple[str, str, str], Any]) -> dict[str, str]:
    """``<stage>.train_steps`` / ``<stage>.train_examples`` of the training runs; ``rail_normalize`` of the
    evaluation runs (per stage, ``<stage>.rail_normalize``, only when the stages differ)."""
    out: dict[str, str] = {}
    for stage, run in sorted(trains.items()):
        for p in ("train_steps", "train_examples"):
            if p in run.data.params:
                out[f"{stage}.{p}"] = run.data.params[p]
    rail: dict[str, set[str]] = {}
    for (stage, _b, _m), run in evals.items():
        if "rail_normalize" in run.data.params:
            rail.setdefault(stage, set()).add(run.data.params["rail_normalize"])
    values = set().union(*rail.values()) if rail else set()
    if len(values) == 1:
        out["rail_normalize"] = values.pop()
    else:
        out.update({f"{s}.rail_normalize": ",".join(sorted(v)) for s, v in sorted(rail.items())})
    return out


def _log_new_params(client: Any, handle: RunHandle, params: dict[str, Any]) -> dict[str, str]:
    """Log the params the run lacks; one it has with another value is kept (MLflow params are immutable) and
    named in a warning. Returns what the run now holds for ``params``' keys."""
    have = client.get_run(handle.run_id).data.params
    wanted = {k: str(v) for k, v in params.items() if v is not None}
    new = {k: v for k, v in wanted.items() if k not in have}
    changed = {k: (have[k], v) for k, v in wanted.items() if k in have and have[k] != v}
    for k, (old, v) in changed.items():
        _warn(f"pipeline run {handle.run_id}: param {k} stays {old!r} (now {v!r}; MLflow params cannot change)")
    log_params(handle, new)
    return {k: have.get(k, v) for k, v in wanted.items()}


def roll_up(parent: RunHandle, params: dict[str, Any] | None = None, *, charts: bool = True) -> RollUp | None:
    """Put the headline results, params, datasets and charts of ``parent``'s child runs on ``parent``."""
    if not parent.enabled:
        return None
    out = RollUp()
    try:
        client = _client(parent.tracking_uri)
        exp_id = parent.experiment_id or client.get_run(parent.run_id).info.experiment_id
        children = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
                                      max_results=10000)
        evals = _latest(children, _eval_key)
        trains = _latest(children, _train_key)
        out.metrics = headline_metrics(evals)
        log_metrics(parent, out.metrics)
        out.params = _log_new_params(client, parent, {**(params or {}), **derived_params(trains, evals)})
        used = [r.info.run_id for r in [*trains.values(), *evals.values()]]
        out.datasets = copy_dataset_inputs(client, used, parent)
        benchmarks = sorted({b for _, b, _ in evals})
        publish_runs_view(client, exp_id, [f"metrics.`{k}`" for k in sorted(out.metrics) if k.endswith(".pearson")]
                          + [f"metrics.`{b}.pearson`" for b in benchmarks] + ["metrics.`loss`"]
                          + [f"params.`{k}`" for k in ("method", "model") if k in out.params])
    except Exception as e:  # noqa: BLE001 - tracking observes
        _failed(f"rolling the stage results up onto pipeline run {parent.run_id}", e)
        return out
    if charts and evals:
        out.charts = _charts(client, parent, evals)
    return out


RUNS_VIEW_KEY = "tract-dist"
"""The shared view the pipeline prints a link to (``#/experiments/<id>/runs?...&viewStateShareKey=tract-dist``)."""
_SHARED_VIEW_TAG = "mlflow.sharedViewState."  # MLflow 3.17's UI: the experiment tag behind a shared runs view
_DEFAULT_COLUMNS = ["attributes.`Source`", "attributes.`User`", "attributes.`Models`", "attributes.`Dataset`"]


def publish_runs_view(client: Any, experiment_id: str, columns: list[str]) -> None:
    """The runs table as the pipeline wants it read: the Source, User, Models and Dataset columns, then the
    headline metrics (``columns``: MLflow's ``metrics.`key``` / ``params.`key``` column ids), newest runs first.

    MLflow 3.17's UI shows a run's 188 params and metrics only through its column picker; its "share view"
    stores a table's state as the experiment tag ``mlflow.sharedViewState.<key>`` (JSON it reads back), opened
    by ``?viewStateShareKey=<key>``. Columns of earlier pipelines stay (another method's stages, benchmarks)."""
    import json

    tag = _SHARED_VIEW_TAG + RUNS_VIEW_KEY
    old = client.get_experiment(experiment_id).tags.get(tag)
    try:
        before = json.loads(old).get("selectedColumns", []) if old else []
    except ValueError:
        before = []
    selected = list(dict.fromkeys([*_DEFAULT_COLUMNS, *[c for c in before if c not in _DEFAULT_COLUMNS], *columns]))
    state = {"selectedColumns": selected, "orderByKey": "attributes.start_time", "orderByAsc": False}
    client.set_experiment_tag(experiment_id, tag, json.dumps(state))


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar for every artifact download; a few small plots need none on the console
    (a value the user set is kept)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if key in os.environ:
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _charts(client: Any, parent: RunHandle, evals: dict[tuple[str, str, str], Any]) -> list[str]:
    """Each evaluation's scatter plot (from its run's artifacts) and the Pearson bar chart, under charts/."""
    from tract_dist.evaluate.plots import pearson_bars

    logged: list[str] = []
    method = client.get_run(parent.run_id).data.tags.get("method", "")
    try:
        with tempfile.TemporaryDirectory(prefix="tract-charts-") as tmp, _no_progress_bars():
            d = Path(tmp) / CHARTS
            d.mkdir()
            bars = {(f"{s} {m}", b): run.data.metrics.get(f"{b}.pearson") for (s, b, m), run in evals.items()}
            pearson_bars(bars, d / "pearson_by_benchmark.png", f"{method} Pearson per benchmark and stage".strip())
            for (s, b, m), run in sorted(evals.items()):
                try:
                    got = client.download_artifacts(run.info.run_id, f"evaluate/{b}/scatter.png", tmp)
                except Exception as e:  # noqa: BLE001 - a missing plot leaves the others
                    _failed(f"reading the scatter plot of run {run.info.run_id}", e)
                    continue
                Path(got).replace(d / f"scatter-{s}-{b}-{m}.png")
            logged = sorted(f"{CHARTS}/{p.name}" for p in d.iterdir())
            client.log_artifacts(parent.run_id, str(d), CHARTS)
    except Exception as e:  # noqa: BLE001
        _failed(f"logging charts to pipeline run {parent.run_id}", e)
        return []
    return logged
