"""Metrics of relative (pairwise) judgements: accuracy, and the position-swap check.

Each record holds ``gold`` (y = P(A is better): 1, 0, a soft value or 0.5 for a tie), ``prediction`` (p(A) with
the responses in the given order, None when failed) and ``swapped`` (p(A) with the responses exchanged, i.e. the
probability that the original B is better; None when not judged or failed).

How ties are counted (stated, since benchmarks differ):
- a *gold* tie (y = 0.5) has no correct verdict: it is left out of every accuracy and counted in ``gold_ties``
  (prometheus-eval leaves ties out too, with ``skip_tie``);
- a *predicted* tie (p(A) exactly 0.5) counts half a correct answer, the expected accuracy of a coin flip
  between the two, so a judge gains nothing by abstaining; it is counted in ``predicted_ties``.

``accuracy`` judges the given order; ``accuracy_swapped`` the swapped order (verdict of 1 − p_swapped);
``accuracy_debiased`` the average of both orders, (p + 1 − p_swapped) / 2. ``position_agreement`` is the share
of pairs whose two orders name the same response (a tie in either order disagrees); ``position_bias`` the mean
of (p + p_swapped − 1) / 2, > 0 when the judge favours the first slot. ``brier`` is the mean (p − y)² over
labelled pairs, the regression term that training minimises.
"""

from __future__ import annotations

import math
from typing import Any


def _ok(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _credit(p: float, y: float) -> float:
    """1 for the verdict that names the better response, 0 for the other, 0.5 for a predicted tie."""
    if p == 0.5:
        return 0.5
    return 1.0 if (p > 0.5) == (y > 0.5) else 0.0


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def pair_block(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of one group of records (see the module docstring)."""
    good = [r for r in records if _ok(r.get("prediction"))]
    decided = [r for r in good if _ok(r.get("gold")) and r["gold"] != 0.5]
    both = [r for r in good if _ok(r.get("swapped"))]
    both_decided = [r for r in both if r in decided]
    out: dict[str, Any] = {
        "n": len(decided), "total": len(records), "failed": len(records) - len(good),
        "gold_ties": sum(1 for r in good if r.get("gold") == 0.5),
        "predicted_ties": sum(1 for r in good if r["prediction"] == 0.5),
        "accuracy": _mean([_credit(r["prediction"], r["gold"]) for r in decided]),
        "brier": _mean([(r["prediction"] - r["gold"]) ** 2 for r in good if _ok(r.get("gold"))]),
    }
    if any(r.get("swapped") is not None for r in records):  # the swap check ran
        out["swap_failed"] = len(good) - len(both)
        out["accuracy_swapped"] = _mean([_credit(1.0 - r["swapped"], r["gold"]) for r in both_decided])
        out["accuracy_debiased"] = _mean([_credit((r["prediction"] + 1.0 - r["swapped"]) / 2.0, r["gold"])
                                          for r in both_decided])
        out["position_agreement"] = _mean([float(r["prediction"] != 0.5 and r["swapped"] != 0.5
                                                 and (r["prediction"] > 0.5) == (r["swapped"] < 0.5)) for r in both])
        out["position_bias"] = _mean([(r["prediction"] + r["swapped"] - 1.0) / 2.0 for r in both])
    return out


def evaluate_pair_predictions(records: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"overall": {...}, "per_category": {name: {...}}}``, the shape ``metrics.flat_metrics`` logs."""
    cats: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("category"):
            cats.setdefault(str(r["category"]), []).append(r)
    return {"overall": pair_block(records), "per_category": {c: pair_block(rs) for c, rs in sorted(cats.items())}}
