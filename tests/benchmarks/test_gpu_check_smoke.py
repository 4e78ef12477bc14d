"""The prepared GPU check runs end to end at tiny shapes on CPU (``--smoke``), so it cannot rot between GPU loans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The plan vs the measured peak of the smoke step (torch's allocation records): +0.8% and +1.0% on cpu-2core.
PLAN_STEP_TOLERANCE = 0.05


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=850)
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    results = summary["results"]
    assert set(results) == {"loss_tests", "loss_bench", "train_step", "generation", "train_packing",
                            "plan_memory", "real_step"}
    bad = {k: v["status"] for k, v in results.items() if v["status"] != "ok"}
    assert not bad and proc.returncode == 0, (bad, proc.stdout[-3000:], proc.stderr[-3000:])
    # The loss benchmark ran the baselines and the project's fused loss, all returning the objective.
    rows = {(r["dtype"], r["batch"], r["impl"]): r for r in results["loss_bench"]["rows"]}
    for dtype, tol in (("bfloat16", 1e-2), ("float32", 1e-5)):
        for impl in ("naive", "fused_torch"):
            row = rows[(dtype, "realistic", impl)]
            assert row["status"] == "ok" and row["loss_err"] < tol, row
        assert rows[(dtype, "realistic", "fused_triton")]["status"].startswith("unavailable")
    # The training step compared the two heads on the same model and batch.
    step = results["train_step"]["report"]
    assert step["first_loss_rel_diff"] < 1e-5 and step["head_grad_rel_diff"] < 1e-4
    # The packing benchmark ran every layout on both length distributions; packed rows have no padding and
    # compute the padded run's loss (the same step).
    packing = {(r["distribution"], r["variant"]): r for r in results["train_packing"]["reports"]["default"]["rows"]}
    assert set(packing) == {(d, v) for d in ("vicuna", "fc") for v in ("padded", "grouped", "packed", "packed_mask")}
    for d in ("vicuna", "fc"):
        assert packing[(d, "packed")]["pad_fraction"] == 0 < packing[(d, "padded")]["pad_fraction"]
        assert packing[(d, "packed")]["attention"] == "tract_packed_sdpa"  # training's choice for packed sdpa
        for v in ("grouped", "packed", "packed_mask"):
            assert packing[(d, v)]["first_loss_rel_diff"] < 1e-5
    # The plan's estimate of the step's activations and loss head against the measured peak (torch's allocation
    # records on CPU), checkpointing off and on.
    plan_rows = results["plan_memory"]["rows"]
    assert [r["checkpointing"] for r in plan_rows] == [False, True]
    assert all(abs(r["error"]) < PLAN_STEP_TOLERANCE for r in plan_rows), plan_rows
    # One REAL round ran its three parts and the hand-overs.
    real = results["real_step"]
    assert real["report"]["rollout_samples_per_s"] > 0 and real["report"]["update_samples_per_s"] > 0
    assert real["last_round"]["handover_full_s"] > 0
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 8  # at most 8 files come back from the device machine
