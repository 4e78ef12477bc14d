"""Pairwise metrics (#29 item 2) on fixed predictions, every number worked out by hand: accuracy with its tie rules
(a gold tie is left out and counted; a predicted tie earns half), the position-swap agreement and bias, and the
accuracy of the swapped and the debiased orders, overall and per category, flattened for MLflow."""

from __future__ import annotations

import pytest

from tract_dist.evaluate.metrics import flat_metrics
from tract_dist.evaluate.pairwise import evaluate_pair_predictions

# gold y = P(A better); prediction = p(A) in the given order; swapped = p(A) with A and B exchanged.
RECORDS = [
    {"id": "1", "gold": 1.0, "prediction": 0.9, "swapped": 0.2, "category": "x"},   # right, consistent
    {"id": "2", "gold": 0.0, "prediction": 0.7, "swapped": 0.6, "category": "x"},   # wrong; swapped says B: right
    {"id": "3", "gold": 1.0, "prediction": 0.5, "swapped": 0.4, "category": "y"},   # predicted tie: half
    {"id": "4", "gold": 0.5, "prediction": 0.8, "swapped": 0.1, "category": "y"},   # gold tie: left out
    {"id": "5", "gold": 0.0, "prediction": None, "swapped": None, "category": "y"},  # failed
    {"id": "6", "gold": 0.2, "prediction": 0.3, "swapped": None, "category": "x"},  # soft gold (B); swap failed
]


def test_accuracy_ties_and_position_swap():
    m = evaluate_pair_predictions(RECORDS)["overall"]
    assert (m["total"], m["failed"], m["gold_ties"], m["predicted_ties"], m["swap_failed"]) == (6, 1, 1, 1, 1)
    assert m["n"] == 4  # records 1, 2, 3, 6
    assert m["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    # swapped order: verdict of 1 - swapped: 1 -> 0.8 (A, right), 2 -> 0.4 (B, right), 3 -> 0.6 (A, right)
    assert m["accuracy_swapped"] == pytest.approx(1.0)
    # debiased (p + 1 - s) / 2: 1 -> 0.85 right, 2 -> 0.55 wrong, 3 -> 0.55 right
    assert m["accuracy_debiased"] == pytest.approx(2 / 3)
    # agreement over 1..4: 1 yes (A / swapped B), 2 no (A / A), 3 no (a tie), 4 yes (A / B)
    assert m["position_agreement"] == pytest.approx(0.5)
    assert m["position_bias"] == pytest.approx(((0.9 + 0.2 - 1) + (0.7 + 0.6 - 1) + (0.5 + 0.4 - 1)
                                                + (0.8 + 0.1 - 1)) / 2 / 4)
    assert m["brier"] == pytest.approx((0.01 + 0.49 + 0.25 + 0.09 + 0.01) / 5)
    per = evaluate_pair_predictions(RECORDS)["per_category"]
    assert per["x"]["accuracy"] == pytest.approx(2 / 3) and per["y"]["n"] == 1 and per["y"]["failed"] == 1
    flat = flat_metrics("hhh", evaluate_pair_predictions(RECORDS))
    assert flat["hhh.accuracy"] == m["accuracy"] and flat["hhh.position_agreement"] == 0.5
    assert flat["hhh.y.gold_ties"] == 1.0


def test_without_the_swap_check_no_swap_metrics():
    m = evaluate_pair_predictions([{k: v for k, v in r.items() if k != "swapped"} for r in RECORDS])["overall"]
    assert "position_agreement" not in m and m["accuracy"] == pytest.approx(2.5 / 4)
    assert evaluate_pair_predictions([])["overall"]["accuracy"] is None
