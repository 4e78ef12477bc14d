"""Checkpoint publication, pruning and resume choice of the torchrun session, without DeepSpeed: manifests,
pinned checkpoints, a corrupt ``latest`` pointer, folders without their completion marker, broken shards,
another run's checkpoint; and the Ray trainer's num_to_keep."""

from __future__ import annotations

from pathlib import Path

import pytest

from tract_dist.train.session import LocalSession, StaleResumeError, verify_checkpoint


def _save(session: LocalSession, step: int, payload: bytes = b"weights") -> Path:
    d = Path(session.begin(step))
    (d / f"step-{step}").mkdir()
    (d / f"step-{step}" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(payload * 100)
    (d / "rng_rank0.pt").write_bytes(b"rng")
    session.commit(str(d), step, {})
    return session.root / f"step-{step}"


def _resumed(session: LocalSession) -> str | None:
    with session.resume_dir() as d:
        return Path(d).name if d else None


def test_prunes_to_keep_but_never_a_pinned_checkpoint(tmp_path):
    s = LocalSession(tmp_path / "ckpt", keep=2, fingerprint="fpA")
    _save(s, 1)
    s.pin(str(tmp_path / "ckpt" / "step-1"), "last good before a NaN")
    for step in (2, 3, 4):
        _save(s, step)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == ["step-1", "step-3", "step-4"]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step-4"
    assert _resumed(s) == "step-4"
    assert verify_checkpoint(tmp_path / "ckpt" / "step-4", "fpA") == 4


def test_corrupt_latest_pointer_falls_back_to_the_newest_complete(tmp_path, capsys):
    s = LocalSession(tmp_path / "ckpt", keep=3, fingerprint="fpA")
    _save(s, 2)
    _save(s, 4)
    (tmp_path / "ckpt" / "latest").write_bytes(b"\xff\xfe garbage")
    assert _resumed(s) == "step-4"
    assert "latest names" in capsys.readouterr().err
    (tmp_path / "ckpt" / "latest").write_text("../../etc")
    assert _resumed(s) == "step-4"


def test_folder_without_completion_marker_is_not_resumed(tmp_path):
    s = LocalSession(tmp_path / "ckpt", keep=3, fingerprint="fpA")
    _save(s, 2)
    step4 = _save(s, 4)
    (step4 / "COMPLETE").unlink()  # e.g. a copy that stopped halfway
    (tmp_path / "tmp-step-6").mkdir()
    assert _resumed(s) == "step-2"


def test_broken_shard_falls_back_to_the_previous_good_checkpoint(tmp_path, capsys):
    s = LocalSession(tmp_path / "ckpt", keep=3, fingerprint="fpA")
    _save(s, 2)
    step4 = _save(s, 4)
    shard = step4 / "step-4" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated after the checkpoint was published
    assert _resumed(s) == "step-2"
    err = capsys.readouterr().err
    assert str(shard) in err and "has 100 bytes, its manifest says 700" in err


def test_another_runs_checkpoint_is_refused_naming_both_fingerprints(tmp_path):
    _save(LocalSession(tmp_path / "ckpt", fingerprint="aaaa1111"), 2)
    other = LocalSession(tmp_path / "ckpt", fingerprint="bbbb2222")
    with pytest.raises(StaleResumeError) as ei:
        _resumed(other)
    assert "aaaa1111" in str(ei.value) and "bbbb2222" in str(ei.value)


def test_failed_save_leaves_latest_and_removes_its_folder(tmp_path):
    s = LocalSession(tmp_path / "ckpt", keep=3, fingerprint="fpA")
    _save(s, 2)
    d = Path(s.begin(4))
    (d / "half-written.pt").write_bytes(b"x")
    s.abort()
    assert not d.exists() and (tmp_path / "ckpt" / "latest").read_text() == "step-2"
    assert _resumed(s) == "step-2"


def test_ray_trainer_keeps_num_to_keep_checkpoints(tmp_path, monkeypatch):
    """The config's training.num_to_keep reaches Ray Train's CheckpointConfig."""
    import ray.train.torch

    import tract_dist.train.trainer as trainer
    from tract_dist.config import load_config
    from tract_dist.train.plan import WorkerPlan

    seen = {}

    class FakeTrainer:
        def __init__(self, fn, **kwargs):
            seen.update(kwargs)

        def fit(self):
            raise RuntimeError("stop here")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    monkeypatch.setattr(trainer, "init_ray_from_config", lambda cluster, address: None)
    monkeypatch.setattr(trainer, "check_placement", lambda cluster: None)
    cfg = load_config(None, ["training.num_to_keep=5", f"cluster.storage_path={tmp_path}"],
                      base={"model": {"name_or_path": "tiny-llama"}})
    with pytest.raises(RuntimeError, match="stop here"):
        trainer._fit_with_ray(cfg, WorkerPlan(config={}, run_dir=str(tmp_path), tracking_uri=""), "run", None)
    assert seen["run_config"].checkpoint_config.num_to_keep == 5
