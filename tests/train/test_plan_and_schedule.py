"""Fast checks of the data position and schedule logic the worker relies on for exact resume."""

import math

import pytest

from tract_dist.train.data import StepPlan, collate
from tract_dist.train.schedule import lr_lambda


def test_every_sample_once_per_epoch_and_disjoint_ranks():
    plan = StepPlan(n_examples=10, micro_batch_size=1, grad_accum=2, world_size=2, seed=3, epochs=2)
    assert plan.global_batch == 4 and plan.steps_per_epoch == 3 and plan.total_steps == 6
    assert plan.padded_per_epoch == 2
    for epoch in range(2):
        seen = []
        for step in range(epoch * 3, epoch * 3 + 3):
            parts = [plan.micro_indices(step, m, r) for m in range(2) for r in range(2)]
            flat = [i for p in parts for i in p]
            assert sorted(flat) == sorted(plan.step_indices(step).tolist())
            seen += flat
        assert set(seen) == set(range(10)) and len(seen) == 12  # 2 repeats fill the last batch
    # Pure function of the step: a fresh plan (a resumed process) gives the same samples.
    again = StepPlan(10, 1, 2, 2, 3, 2)
    assert all(again.step_indices(s).tolist() == plan.step_indices(s).tolist() for s in range(6))
    assert plan.step_indices(0).tolist() != plan.step_indices(3).tolist()  # epochs are reshuffled


def test_max_steps_and_fractional_epochs():
    assert StepPlan(100, 2, 1, 2, 0, 0.5).total_steps == math.ceil(0.5 * 25)
    assert StepPlan(100, 2, 1, 2, 0, 3, max_steps=7).total_steps == 7


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warmup_then_decay(kind):
    f = lr_lambda(kind, total_steps=20, warmup_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    if kind == "cosine":
        assert f(11) == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 18)))
    if kind == "linear":
        assert f(11) == pytest.approx(1 - 9 / 18)
    if kind == "constant":
        assert f(19) == 1.0
    else:
        assert f(20) == pytest.approx(0.0, abs=1e-12)


def test_collate_right_pads():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "score_position": 1, "score": 3.0},
            {"input_ids": [5], "labels": [-100], "score_position": 0, "score": 4.5}]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["score_positions"].tolist() == [1, 0] and b["score_targets"].tolist() == [3.0, 4.5]


def test_user_deepspeed_json_gets_auto_values_filled():
    from pathlib import Path

    from tract_dist.config import load_config
    from tract_dist.train.ds_config import build_ds_config

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "paper-mistral-7b.yaml")
    ds = build_ds_config(cfg, world_size=8, bf16=True, gpu=True)
    assert ds["train_batch_size"] == 2 * 8 * 8 and ds["gradient_accumulation_steps"] == 8
    assert ds["optimizer"]["params"]["lr"] == 1e-5 and ds["optimizer"]["params"]["weight_decay"] == 0.0
    assert ds["zero_optimization"]["reduce_bucket_size"] == 50_000_000 and ds["gradient_clipping"] == 1.0
    assert "auto" not in str(ds)
