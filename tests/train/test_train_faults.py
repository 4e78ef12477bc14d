"""Real training runs (tiny Llama, DeepSpeed ZeRO-3, one process or two torchrun ranks) meeting the faults of
issue 13: a NaN loss, a full disk during a save, a worker SIGKILLed halfway through a save, a config change
under the same run name, a second invocation of a running run."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train_fault_hooks

from tract_dist.config import load_config

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp: Path, data: Path, **over):
    base = {
        "model": {"name_or_path": "tiny-llama", "tokenizer": "smollm2"},
        "data": {"train_path": str(data), "train_format": "jsonl", "max_length": 512, "max_examples": 8},
        "training": {"output_dir": str(tmp / "runs"), "max_steps": 5, "micro_batch_size": 1, "save_steps": 2,
                     "learning_rate": 1e-3, "seed": 1, "num_to_keep": 1},
        "tracking": {"enabled": False},
        "cluster": {"num_workers": 1},
    }
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()], base=base)


def _ckpts(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


@pytest.mark.timeout(300)
def test_nan_stops_before_any_save_names_step_records_and_pins_the_last_good(tmp_path, quickstart_data,
                                                                            monkeypatch):
    import tract_dist.models.cot_raft as cot_raft
    from tract_dist.train.data import StepPlan, load_encoded
    from tract_dist.train.trainer import run_training
    from tract_dist.train.worker import NonFiniteLossError

    cfg = _cfg(tmp_path, quickstart_data)
    real = cot_raft.final_hidden_states
    calls = {"n": 0}

    def nan_on_third_step(*args, **kwargs):  # one forward per step (micro 1, accumulation 1, world 1)
        calls["n"] += 1
        h = real(*args, **kwargs)
        return h * float("nan") if calls["n"] == 3 else h

    monkeypatch.setattr(cot_raft, "final_hidden_states", nan_on_third_step)
    with pytest.raises(NonFiniteLossError) as ei:
        run_training(cfg, run_name="nan", launcher="inline")
    run_dir = tmp_path / "runs" / "nan"
    data = load_encoded(run_dir)
    t = cfg.training
    plan = StepPlan(len(data), t.micro_batch_size * t.gradient_accumulation_steps, t.seed, t.epochs, t.max_steps)
    ids = [str(data[i]["id"]) for i in plan.step_indices(2).tolist()]
    msg = str(ei.value)
    assert "non-finite training values at step 3: loss=nan" in msg
    assert f"batch record ids: {', '.join(ids)}" in msg
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'step-2'}" in msg
    assert _ckpts(run_dir) == ["step-2"]  # nothing of step 3 (or later) was written
    assert (run_dir / "checkpoints" / "step-2" / "PINNED").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    info = json.loads((run_dir / "nonfinite.json").read_text())
    assert info["step"] == 3 and info["record_ids"] == ids

    # A rerun (the fault is gone) resumes from the pinned checkpoint; its later saves, with num_to_keep=1,
    # prune each other but not the pinned one.
    monkeypatch.setattr(cot_raft, "final_hidden_states", real)
    r = run_training(cfg, run_name="nan", launcher="inline")
    assert json.loads((r.run_dir / "train_result.json").read_text())["start_step"] == 2
    assert _ckpts(run_dir) == ["step-2", "step-5"]


@pytest.mark.timeout(300)
def test_enospc_during_a_save_keeps_the_last_good_checkpoint_and_says_so(tmp_path, quickstart_data,
                                                                         monkeypatch):
    from tract_dist.train.session import CheckpointError
    from tract_dist.train.trainer import run_training

    cfg = _cfg(tmp_path, quickstart_data, **{"training.num_to_keep": 2})
    real_save = torch.save

    def full_disk_at_step_4(obj, f, *args, **kwargs):
        if "tmp-step-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_at_step_4)
    with pytest.raises(CheckpointError) as ei:
        run_training(cfg, run_name="full", launcher="inline")
    run_dir = tmp_path / "runs" / "full"
    msg = str(ei.value)
    assert "checkpoint of step 4 could not be written" in msg and "No space left on device" in msg
    assert f"the last good checkpoint is kept: {run_dir / 'checkpoints' / 'step-2'}" in msg
    assert _ckpts(run_dir) == ["step-2"]  # the partial tmp-step-4 was removed
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-2"


def _write_cfg(tmp: Path, data: Path, **over) -> Path:
    cfg = _cfg(tmp, data, **over)
    p = tmp / "train.yaml"
    p.write_text(json.dumps(cfg.model_dump()))
    return p


@pytest.mark.timeout(400)
def test_worker_sigkilled_during_a_save_resumes_from_the_last_good_one(tmp_path, quickstart_data):
    """Two torchrun ranks; rank 1 is SIGKILLed after writing its shards of step 4 (the checkpoint is not
    published); the rerun resumes from step 2 and finishes."""
    # max_length 1536: two ranks need two examples, and at 512 tokens only one quickstart record fits.
    cfg_file = _write_cfg(tmp_path, quickstart_data, **{"cluster.num_workers": 2, "training.max_steps": 4,
                                                        "training.num_to_keep": 2, "data.max_length": 1536})
    args = ["train", str(cfg_file), "--launcher", "torchrun", "--run-name", "killed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(train_fault_hooks.cli_with_hook("kill_in_save", step=4) + args, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "torchrun workers failed" in first.stderr and "Traceback (most recent call last)" not in \
        first.stderr.split("torchrun workers failed")[-1]
    run_dir = tmp_path / "runs" / "killed"
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-2" and not (ckpt / "step-4").exists()
    assert (ckpt / "tmp-step-4").is_dir()  # the half-written save, never published

    second = subprocess.run([sys.executable, "-m", "tract_dist.cli", *args], env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((run_dir / "train_result.json").read_text())["start_step"] == 2
    assert _ckpts(run_dir) == ["step-2", "step-4"]


@pytest.mark.timeout(300)
def test_config_change_under_the_same_run_name_is_refused_then_fresh(tmp_path, quickstart_data, capsys):
    from tract_dist.cli import main

    cfg_file = _write_cfg(tmp_path, quickstart_data, **{"training.max_steps": 1})
    base = ["train", str(cfg_file), "--launcher", "inline", "--run-name", "r"]
    assert main(base) == 0
    run_dir = tmp_path / "runs" / "r"
    old_fp = json.loads((run_dir / "run.json").read_text())["fingerprint"]
    capsys.readouterr()
    assert main([*base, "training.learning_rate=0.01"]) == 2
    err = capsys.readouterr().err
    new_fp = err.split("this configuration's fingerprint is ")[1].split()[0]
    assert old_fp in err and new_fp != old_fp and "--fresh" in err
    assert main([*base, "training.learning_rate=0.01", "--fresh"]) == 0
    assert json.loads((run_dir / "run.json").read_text())["fingerprint"] == new_fp
    moved = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("r.replaced-")]
    assert len(moved) == 1 and json.loads((moved[0] / "run.json").read_text())["fingerprint"] == old_fp


@pytest.mark.timeout(60)
def test_second_invocation_of_a_running_run_is_refused(tmp_path, quickstart_data, lock_holder):
    from tract_dist.fsutil import LockHeldError
    from tract_dist.train.trainer import run_training

    with lock_holder(tmp_path / "runs" / "busy", "training run") as pid:
        with pytest.raises(LockHeldError, match=f"training run .*busy is in use by pid {pid}"):
            run_training(_cfg(tmp_path, quickstart_data), run_name="busy", launcher="inline")
