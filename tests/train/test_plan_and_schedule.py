"""Fast checks of the data position and schedule logic the worker relies on for exact resume."""

import math

import pytest

from tract_dist.train.batching import split_padded
from tract_dist.train.data import StepPlan, collate
from tract_dist.train.schedule import lr_lambda


def test_every_sample_once_per_epoch_and_disjoint_ranks():
    plan = StepPlan(n_examples=10, global_batch=4, seed=3, epochs=2)  # micro 1 x accum 2 x world 2
    assert plan.steps_per_epoch == 3 and plan.total_steps == 6
    assert plan.padded_per_epoch == 2
    for epoch in range(2):
        seen = []
        for step in range(epoch * 3, epoch * 3 + 3):
            layout = split_padded(plan.step_indices(step).tolist(), [1] * 10, world=2, micro=1)
            flat = [i for m in layout for r in m for i in r]
            assert sorted(flat) == sorted(plan.step_indices(step).tolist())
            seen += flat
        assert set(seen) == set(range(10)) and len(seen) == 12  # 2 repeats fill the last batch
    # Pure function of the step: a fresh plan (a resumed process) gives the same samples.
    again = StepPlan(10, 4, 3, 2)
    assert all(again.step_indices(s).tolist() == plan.step_indices(s).tolist() for s in range(6))
    assert plan.step_indices(0).tolist() != plan.step_indices(3).tolist()  # epochs are reshuffled


def test_max_steps_and_fractional_epochs():
    assert StepPlan(100, 4, 0, 0.5).total_steps == math.ceil(0.5 * 25)
    assert StepPlan(100, 4, 0, 3, max_steps=7).total_steps == 7


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
    from tract_dist.train.strategy import build_ds_config

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "paper-mistral-7b.yaml")
    ds = build_ds_config(cfg.training, world_size=8, bf16=True, gpu=True)
    assert ds["train_batch_size"] == 8 * 1 * 8 and ds["gradient_accumulation_steps"] == 1
    assert ds["optimizer"]["params"]["lr"] == 1e-5 and ds["optimizer"]["params"]["weight_decay"] == 0.0
    assert ds["zero_optimization"]["reduce_bucket_size"] == 50_000_000 and ds["gradient_clipping"] == 1.0
    assert "auto" not in str(ds) and "checkpoint" not in ds
    universal = build_ds_config(cfg.training, world_size=8, bf16=True, gpu=True, load_universal=True)
    assert universal["checkpoint"] == {"load_universal": True}  # resuming a checkpoint of another world size


def _encoded_rows(n: int, seed: int) -> list[dict]:
    """Rows laid out as data.encode writes them: prompt (not trained), CoT, score token (not trained), EOS."""
    import random

    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        prompt, cot = rnd.randint(1, 6), rnd.randint(0, 9)
        ids = [rnd.randint(6, 19) for _ in range(prompt + cot)] + [rnd.randint(1, 5), 2]
        labels = [-100] * prompt + ids[prompt:prompt + cot] + [-100, 2]
        rows.append({"id": str(i), "input_ids": ids, "labels": labels, "score_position": prompt + cot - 1,
                     "score": float(rnd.randint(1, 5)), "n_ce": sum(x != -100 for x in labels)})
    return rows


@pytest.mark.parametrize("ce_on_score_token", [False, True])
def test_step_denominators_are_the_losss_own_counts_over_the_whole_global_batch(ce_on_score_token):
    """The rule (loss_denominators via the step plan) against the loss itself: on the step's whole global
    batch in one call, the loss's default (local) denominators are its CE-target and score-row counts."""
    import torch

    from tract_dist.loss import CoTRaftLossOptions, cot_raft_loss_with_options
    from tract_dist.models import select_loss_rows

    rows = _encoded_rows(11, seed=4)
    plan = StepPlan(n_examples=11, global_batch=8, seed=1, epochs=2)
    options = CoTRaftLossOptions([1, 2, 3, 4, 5], [1.0, 2.0, 3.0, 4.0, 5.0], ce_on_score_token=ce_on_score_token,
                                 impl="reference")
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(20, 8, generator=g)
    for step in range(plan.total_steps):
        den = plan.loss_denominators(step, [r["n_ce"] for r in rows], ce_on_score_token=ce_on_score_token,
                                     world_size=2)
        batch = collate([rows[i] for i in plan.step_indices(step).tolist()], pad_id=0)
        sel = select_loss_rows(batch["labels"], batch["score_positions"], batch["score_targets"])
        hidden = torch.randn(sel.row_index.numel(), 8, generator=g)
        out = cot_raft_loss_with_options(hidden, weight, sel.targets, sel.score_rows, sel.score_targets, options)
        assert (den.ce, den.mse) == (out.n_ce_tokens, out.n_score_rows) == (den.ce, plan.global_batch)
        assert den.per_rank() == {"ce_denominator": den.ce / 2, "mse_denominator": den.mse / 2}


def test_worker_plan_round_trips_through_ray_and_torchrun_forms(tmp_path):
    """Ray gets to_dict(), torchrun reads to_json() from a file: both give the same plan back; the file form
    holds no credential."""
    import json
    import pickle

    from tract_dist.tracking import redact_text
    from tract_dist.train.hooks import HookSpec
    from tract_dist.train.plan import WorkerPlan

    secret = "https://alice:s3cr3t@mlflow.example.com"
    plan = WorkerPlan(config={"tracking": {"tracking_uri": secret}}, run_dir=str(tmp_path), tracking_uri=secret,
                      run_id="r", launcher="torchrun", fingerprint="fp", invocation="inv",
                      hooks=(HookSpec("pkg.mod:fn", {"step": 3}),))
    assert WorkerPlan.from_dict(plan.to_dict()) == plan == pickle.loads(pickle.dumps(plan))
    written = plan.to_json(redact=redact_text)
    assert "s3cr3t" not in written
    back = WorkerPlan.from_dict(json.loads(written))
    assert back.hooks == plan.hooks and back.tracking_uri == redact_text(secret)
    with pytest.raises(ValueError, match="unknown fields"):
        WorkerPlan.from_dict({**plan.to_dict(), "fail_at_step": 3})


def test_hooks_are_called_at_named_points_with_their_options(tmp_path, monkeypatch):
    from tract_dist.train import hooks as hooks_module
    from tract_dist.train.hooks import (STEP_BEGIN, HookContext, HookError, Hooks, HookSpec, install_hooks,
                                        installed_hooks, uninstall_hooks)

    mod = tmp_path / "my_hooks.py"
    mod.write_text("seen = []\ndef record(point, ctx, *, tag):\n    seen.append((point, ctx.step, tag))\n")
    spec = HookSpec(f"{mod}:record", {"tag": "x"})
    monkeypatch.setattr(hooks_module, "_INSTALLED", [])
    assert installed_hooks() == ()  # production: none
    install_hooks(spec)
    assert installed_hooks() == (spec,)
    hooks = Hooks(installed_hooks())
    hooks.call(STEP_BEGIN, HookContext(step=4, rank=0, world_size=1, run_dir=tmp_path))
    assert hooks._hooks[0][0].__globals__["seen"] == [(STEP_BEGIN, 4, "x")]
    uninstall_hooks()
    assert installed_hooks() == ()
    # nothing outside the process installs one: not the variable older versions read
    monkeypatch.setenv("TRACT_DIST_TRAIN_HOOKS", f'[{{"target": "{mod}:record"}}]')
    assert installed_hooks() == ()
    with pytest.raises(HookError, match="nope"):
        Hooks((HookSpec(f"{mod}:nope"),))


def test_lam_warmup_ramps_linearly_from_zero():
    from tract_dist.train.schedule import lam_at

    assert [lam_at(s, 0.5, 4) for s in range(7)] == [0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert [lam_at(s, 0.5, 0) for s in range(3)] == [0.5, 0.5, 0.5]  # no warm-up: lam from the first step
    assert lam_at(0, 2.0, 1) == 0.0 and lam_at(1, 2.0, 1) == 2.0
