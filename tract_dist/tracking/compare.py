"""``tract-dist compare``: one row per evaluated model (method, model, stage, inference), one column group per
benchmark, from the evaluation runs in an MLflow store."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

METRICS = ("pearson", "spearman", "kendall", "rmse")


def collect(tracking_uri: str, experiment: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows keyed by (pipeline, method, model, stage, inference) with ``{benchmark: {metric: value}}``."""
    from mlflow.tracking import MlflowClient

    from tract_dist.tracking.mlflow_run import resolve_uri

    client = MlflowClient(resolve_uri(tracking_uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no experiment '{experiment}' in {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.benchmark != ''", max_results=10000,
                              order_by=["attributes.start_time ASC"])
    rows: dict[tuple[str, ...], dict[str, Any]] = {}
    benchmarks: list[str] = []
    for run in runs:
        t = run.data.tags
        key = (t.get("pipeline", "-"), t.get("method", "-"), t.get("model", "-"), t.get("model_stage", "-"),
               t.get("inference", "-"))
        bench = t["benchmark"]
        if bench not in benchmarks:
            benchmarks.append(bench)
        row = rows.setdefault(key, {"pipeline": key[0], "method": key[1], "model": key[2], "stage": key[3],
                                    "inference": key[4], "results": defaultdict(dict)})
        for m in METRICS:
            key = f"{bench}.{m}"  # evaluation logs "{benchmark}.{metric}" (and per category below it)
            if key in run.data.metrics:
                row["results"][bench][m] = run.data.metrics[key]  # later runs (reruns) overwrite earlier ones
    return list(rows.values()), benchmarks


def compare_runs(tracking_uri: str, experiment: str, fmt: str = "table") -> str:
    rows, benches = collect(tracking_uri, experiment)
    if fmt == "json":
        return json.dumps([{**r, "results": dict(r["results"])} for r in rows], indent=2)
    head = ["method", "model", "stage", "inference"] + [f"{b}:{m}" for b in benches for m in METRICS]
    if len(benches) > 1:
        head += [f"mean:{m}" for m in METRICS]
    body = []
    for r in rows:
        cells = [r["method"], r["model"], r["stage"], r["inference"]]
        for b in benches:
            cells += [_fmt(r["results"].get(b, {}).get(m)) for m in METRICS]
        if len(benches) > 1:
            for m in METRICS:
                vals = [r["results"][b][m] for b in benches if m in r["results"].get(b, {})]
                cells.append(_fmt(sum(vals) / len(vals) if len(vals) == len(benches) else None))
        body.append(cells)
    if fmt == "csv":
        return "\n".join(",".join(c) for c in [head] + body)
    widths = [max(len(x) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in body]
    if not body:
        lines.append("(no evaluation runs yet)")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
