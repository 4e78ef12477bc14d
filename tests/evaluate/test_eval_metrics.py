"""Metrics against scipy/numpy on known vectors; failed predictions are excluded and counted."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tract_dist.evaluate.metrics import evaluate_predictions, flat_metrics, regression_metrics

PRED = [1.2, 2.9, 3.1, 4.8, 4.4, 2.0, 3.3, 1.0]
GOLD = [1.0, 3.0, 3.0, 5.0, 4.0, 2.0, 4.0, 1.0]


def test_regression_metrics_match_scipy_and_numpy():
    m = regression_metrics(PRED, GOLD)
    p, g = np.array(PRED), np.array(GOLD)
    assert m["n"] == 8
    assert m["pearson"] == pytest.approx(stats.pearsonr(p, g)[0], rel=1e-12)
    assert m["spearman"] == pytest.approx(stats.spearmanr(p, g)[0], rel=1e-12)
    assert m["kendall"] == pytest.approx(stats.kendalltau(p, g)[0], rel=1e-12)
    assert m["rmse"] == pytest.approx(math.sqrt(sum((a - b) ** 2 for a, b in zip(PRED, GOLD)) / 8), rel=1e-12)
    # hand check of Pearson from its definition
    pc, gc = p - p.mean(), g - g.mean()
    assert m["pearson"] == pytest.approx((pc @ gc) / math.sqrt((pc @ pc) * (gc @ gc)), rel=1e-12)


def test_undefined_correlations_are_none():
    m = regression_metrics([3.0, 3.0, 3.0], [1.0, 2.0, 3.0])
    assert m["pearson"] is None and m["spearman"] is None and m["kendall"] is None
    assert m["rmse"] == pytest.approx(math.sqrt((4 + 1 + 0) / 3))
    assert regression_metrics([], [])["n"] == 0
    with pytest.raises(ValueError, match="lengths"):
        regression_metrics([1.0], [1.0, 2.0])


def test_failed_predictions_are_counted_not_scored():
    recs = [{"prediction": p, "gold": g, "category": "a" if i % 2 else "b"} for i, (p, g) in enumerate(zip(PRED, GOLD))]
    recs += [{"prediction": None, "gold": 3.0, "category": "a"}, {"prediction": float("nan"), "gold": 2.0}]
    res = evaluate_predictions(recs)
    assert res["overall"]["total"] == 10 and res["overall"]["failed"] == 2 and res["overall"]["n"] == 8
    assert res["overall"]["pearson"] == pytest.approx(stats.pearsonr(PRED, GOLD)[0], rel=1e-12)
    a = res["per_category"]["a"]
    assert a["total"] == 5 and a["failed"] == 1
    assert a["pearson"] == pytest.approx(stats.pearsonr(PRED[1::2], GOLD[1::2])[0], rel=1e-12)
    flat = flat_metrics("bench", res)
    assert flat["bench.pearson"] == res["overall"]["pearson"] and flat["bench.a.failed"] == 1.0


def test_mean_cot_count_is_reported_with_the_metrics():
    """The CoTs each judged input used (fixed, or chosen per input by num_cots=auto) are averaged into
    cots_mean; failed predictions and judgements without CoTs (rail) do not count."""
    recs = [{"prediction": p, "gold": g, "detail": {"cots": ["c"] * n}} for p, g, n in zip(PRED, GOLD, [3, 8, 3, 5, 4, 3, 8, 6])]
    recs.append({"prediction": None, "gold": 3.0, "detail": {"cots": ["c"] * 8}})
    res = evaluate_predictions(recs)
    assert res["overall"]["cots_mean"] == pytest.approx(40 / 8)
    assert flat_metrics("bench", res)["bench.cots_mean"] == pytest.approx(5.0)
    rail = evaluate_predictions([{"prediction": p, "gold": g, "detail": {"cots": []}} for p, g in zip(PRED, GOLD)])
    assert "cots_mean" not in rail["overall"]
