"""Evaluating fixed, deterministic predictions on the real Vicuna set gives the numbers documented in
tract_dist/evaluate/README.md (and agrees with an independent scipy/numpy computation from the raw JSON)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from tract_dist.evaluate.runner import load_predictions, report, write_predictions

# tract_dist/evaluate/README.md, "Reference numbers on Vicuna Bench"
DOC_FIRST_RATER = {"n": 320, "pearson": 0.928807, "spearman": 0.873356, "kendall": 0.811890, "rmse": 0.307883}
DOC_ROUNDED_10PCT_FAILED = {"n": 288, "failed": 32, "pearson": 0.968692, "spearman": 0.923485,
                            "kendall": 0.861736, "rmse": 0.205067}
DOC_MATH_ROUNDED = {"n": 12, "pearson": 0.994805, "rmse": 0.166667}


def _raw(vicuna_path):
    return json.loads(vicuna_path.read_text(encoding="utf-8"))


def _independent(pred, gold):
    p, g = np.array(pred, dtype=np.float64), np.array(gold, dtype=np.float64)
    return {"pearson": stats.pearsonr(p, g)[0], "spearman": stats.spearmanr(p, g)[0],
            "kendall": stats.kendalltau(p, g)[0], "rmse": float(np.sqrt(np.mean((p - g) ** 2)))}


def test_first_rater_as_prediction(vicuna_path, vicuna_examples, tmp_path):
    raw = _raw(vicuna_path)
    assert len(raw) == len(vicuna_examples) == 320
    recs = [{"id": ex.id, "prediction": float(r["gpt4_score"][0]), "gold": ex.score, "category": ex.category}
            for ex, r in zip(vicuna_examples, raw)]
    write_predictions(recs, tmp_path / "predictions.jsonl")
    res = report(load_predictions(tmp_path / "predictions.jsonl"), tmp_path, "vicuna")
    o = res["overall"]
    ref = _independent([r["gpt4_score"][0] for r in raw], [sum(r["gpt4_score"]) / 3 for r in raw])
    for k in ("pearson", "spearman", "kendall", "rmse"):
        assert o[k] == pytest.approx(ref[k], rel=1e-12)
        assert o[k] == pytest.approx(DOC_FIRST_RATER[k], abs=1e-6)
    assert o["n"] == 320 and o["failed"] == 0
    assert sum(m["total"] for m in res["per_category"].values()) == 320
    assert (tmp_path / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "metrics.json").read_text())["overall"]["n"] == 320


def test_rounded_label_with_failures(vicuna_path, vicuna_examples, tmp_path):
    raw = _raw(vicuna_path)
    recs = []
    for i, (ex, r) in enumerate(zip(vicuna_examples, raw)):
        label = sum(r["gpt4_score"]) / 3
        recs.append({"id": ex.id, "prediction": None if i % 10 == 0 else float(math.floor(label + 0.5)),
                     "gold": ex.score, "category": ex.category})
    res = report(recs, tmp_path, "vicuna")
    o = res["overall"]
    kept = [(math.floor(sum(r["gpt4_score"]) / 3 + 0.5), sum(r["gpt4_score"]) / 3)
            for i, r in enumerate(raw) if i % 10]
    ref = _independent([k for k, _ in kept], [g for _, g in kept])
    assert o["failed"] == DOC_ROUNDED_10PCT_FAILED["failed"] and o["n"] == DOC_ROUNDED_10PCT_FAILED["n"]
    for k in ("pearson", "spearman", "kendall", "rmse"):
        assert o[k] == pytest.approx(ref[k], rel=1e-12)
        assert o[k] == pytest.approx(DOC_ROUNDED_10PCT_FAILED[k], abs=1e-6)
    m = res["per_category"]["math"]
    assert m["n"] == 12 and m["pearson"] == pytest.approx(DOC_MATH_ROUNDED["pearson"], abs=1e-6)
    assert m["rmse"] == pytest.approx(DOC_MATH_ROUNDED["rmse"], abs=1e-6)
