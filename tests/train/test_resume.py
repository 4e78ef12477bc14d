"""What a checkpoint says about the run that wrote it (train.resume), for this version's and older checkpoints.
The resume itself (2 -> 1 and 2 -> 3 workers through DeepSpeed's universal format) runs in test_training.py."""

from __future__ import annotations

import pytest

from tract_dist.train.resume import CheckpointState, needs_universal, read_checkpoint_state


def _shards(folder, step: int, world: int) -> None:
    tag = folder / f"step-{step}"
    tag.mkdir(parents=True)
    for r in range(world):
        (tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")


def test_state_written_by_this_version_and_read_back(tmp_path):
    state = CheckpointState(step=4, world_size=2, global_batch=8, fingerprint="fp")
    state.write(tmp_path)
    _shards(tmp_path, 4, 2)
    assert read_checkpoint_state(tmp_path, world_size=3) == state
    assert state.client_state() == {"step": 4, "fingerprint": "fp", "world_size": 2, "global_batch": 8}
    assert needs_universal(state, 3) and not needs_universal(state, 2) and not needs_universal(None, 3)


def test_older_checkpoints_give_their_step_and_world_from_deepspeeds_files(tmp_path):
    (tmp_path / "latest").write_text("step-6")  # DeepSpeed's tag file; no train_state.json
    _shards(tmp_path, 6, 4)
    assert read_checkpoint_state(tmp_path, world_size=1) == CheckpointState(6, 4, None, None, sharded=True)
    stage0 = tmp_path / "stage0"  # ZeRO-0: one unpartitioned file, loads on any world size
    (stage0 / "step-2").mkdir(parents=True)
    (stage0 / "latest").write_text("step-2")
    unsharded = read_checkpoint_state(stage0, world_size=3)
    assert (unsharded.world_size, unsharded.sharded) == (3, False) and not needs_universal(unsharded, 5)


def test_unreadable_state_is_named(tmp_path):
    (tmp_path / "train_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="train_state.json: unreadable checkpoint state"):
        read_checkpoint_state(tmp_path, world_size=1)
    with pytest.raises(ValueError, match="names the checkpoint's step"):
        read_checkpoint_state(tmp_path / "empty", world_size=1)
