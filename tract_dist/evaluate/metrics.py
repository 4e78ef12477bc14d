"""Agreement metrics of predicted vs gold scores: Pearson (the paper's headline), Spearman, Kendall, RMSE.

Correlations come from ``scipy.stats`` (Kendall is tau-b, scipy's default, which handles the many ties of
1-5 scores). Predictions that failed (None/NaN: unparseable decode output, dropped prompts, worker errors) are
left out of the metrics and counted, overall and per category, so a judge cannot look better by failing.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
from scipy import stats


def regression_metrics(pred: Iterable[float], gold: Iterable[float]) -> dict[str, float | int | None]:
    """n, pearson, spearman, kendall, rmse over paired values (a correlation is None when undefined)."""
    p = np.asarray(list(pred), dtype=np.float64)
    g = np.asarray(list(gold), dtype=np.float64)
    if p.shape != g.shape:
        raise ValueError(f"prediction and gold lengths differ: {p.shape[0]} vs {g.shape[0]}")
    out: dict[str, float | int | None] = {"n": int(p.size), "pearson": None, "spearman": None, "kendall": None,
                                          "rmse": None}
    if p.size == 0:
        return out
    out["rmse"] = float(np.sqrt(np.mean((p - g) ** 2)))
    if p.size >= 2 and np.ptp(p) > 0 and np.ptp(g) > 0:  # correlations of a constant vector are undefined
        out["pearson"] = float(stats.pearsonr(p, g).statistic)
        out["spearman"] = float(stats.spearmanr(p, g).statistic)
        out["kendall"] = float(stats.kendalltau(p, g).statistic)
    return out


def _ok(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def evaluate_predictions(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics over records with ``prediction`` (None when failed), ``gold`` and optional ``category``.

    Returns ``{"overall": {..., "total", "failed"}, "per_category": {name: {...}}}``; with CoT judgements
    (a ``detail`` holding the ``cots``), also ``cots_mean``: the mean number of CoTs per judged input (fixed by
    ``evaluation.num_cots``, or chosen per input by ``auto``).
    """
    def block(rs: list[dict[str, Any]]) -> dict[str, Any]:
        good = [r for r in rs if _ok(r["prediction"])]
        m = regression_metrics([r["prediction"] for r in good], [r["gold"] for r in good])
        out = {**m, "total": len(rs), "failed": len(rs) - len(good)}
        counts = [len(d["cots"]) for r in good if isinstance(d := r.get("detail"), dict) and d.get("cots")]
        if counts:
            out["cots_mean"] = sum(counts) / len(counts)
        return out

    cats: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("category"):
            cats.setdefault(str(r["category"]), []).append(r)
    return {"overall": block(records), "per_category": {c: block(rs) for c, rs in sorted(cats.items())}}


def flat_metrics(name: str, result: dict[str, Any]) -> dict[str, float]:
    """``{name}.pearson``, ``{name}.{category}.rmse``, ... for MLflow (undefined values left out)."""
    out = {f"{name}.{k}": float(v) for k, v in result["overall"].items() if v is not None}
    for cat, m in result["per_category"].items():
        out.update({f"{name}.{cat}.{k}": float(v) for k, v in m.items() if v is not None})
    return out
