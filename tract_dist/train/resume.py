"""What a checkpoint says about the run that wrote it, and resuming it on another number of workers.

Every checkpoint carries ``train_state.json`` (rank 0 writes it beside the ZeRO shards): the step, the world
size and the global batch of the run. The global batch belongs to the run, not to the world size: the resumed
step plan keeps it, so every later step holds the samples it would have held without the interruption, and the
learning-rate schedule keeps its length (:class:`tract_dist.train.data.StepPlan`). The data position is then the
step itself; only the split of each step's samples over the workers changes (:mod:`tract_dist.train.batching`).

ZeRO partitions the parameters and the optimizer state by rank, so a checkpoint of W workers loads only on W
workers. On another world size rank 0 converts it once with DeepSpeed's ``ds_to_universal`` (one fp32 tensor and
its Adam moments per parameter) under ``RUN_DIR/universal``, every rank loads its new partition from there
(``checkpoint.load_universal``), and the copy is removed. The checkpoint itself is never modified.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from tract_dist.fsutil import atomic_write_json

if TYPE_CHECKING:
    from tract_dist.train.strategy import DeepSpeedStrategy

STATE_FILE = "train_state.json"
UNIVERSAL_DIR = "universal"  # under the run folder: shared by the ranks, like the encoded data


@dataclass(frozen=True)
class CheckpointState:
    """The run as a checkpoint records it."""

    step: int
    world_size: int
    global_batch: int | None  # None: a checkpoint written before the global batch was recorded
    fingerprint: str | None = None
    sharded: bool = True  # ZeRO optimizer shards, one per rank: loading on another world size needs conversion

    @property
    def tag(self) -> str:
        """DeepSpeed's tag (the sub-folder holding the shards)."""
        return f"step-{self.step}"

    def client_state(self) -> dict[str, Any]:
        """What DeepSpeed stores as the checkpoint's client state (read back by ``load``)."""
        return {"step": self.step, "fingerprint": self.fingerprint, "world_size": self.world_size,
                "global_batch": self.global_batch}

    def write(self, ckpt: str | Path) -> None:
        d = asdict(self)
        d.pop("sharded")  # a property of the files, read from them
        atomic_write_json(Path(ckpt) / STATE_FILE, d)


def read_checkpoint_state(ckpt: str | Path, world_size: int) -> CheckpointState:
    """The state of checkpoint folder ``ckpt``. The world size is counted from the ZeRO shard files (the truth),
    with ``train_state.json`` for the rest; a checkpoint without that file (older versions) gives its step from
    DeepSpeed's ``latest`` tag and no global batch, and an unpartitioned one of an older version (ZeRO-0, no shard
    files) is taken to be of ``world_size``, the resuming world (it loads on any)."""
    root = Path(ckpt)
    f = root / STATE_FILE
    if f.is_file():
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
            step, world, batch, fp = int(d["step"]), int(d["world_size"]), d.get("global_batch"), d.get("fingerprint")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{f}: unreadable checkpoint state ({type(e).__name__}: {e})") from None
    else:
        latest = root / "latest"
        tag = latest.read_text(encoding="utf-8").strip() if latest.is_file() else ""
        if not tag.startswith("step-") or not tag[5:].isdigit():
            raise ValueError(f"{root}: neither {STATE_FILE} nor a DeepSpeed 'latest' tag names the checkpoint's step")
        step, world, batch, fp = int(tag[5:]), world_size, None, None
    shards = sorted((root / f"step-{step}").glob("*zero_pp_rank_*_optim_states.pt"))
    if shards:
        world = len(shards)
    return CheckpointState(step=step, world_size=world, global_batch=int(batch) if batch else None,
                           fingerprint=fp, sharded=bool(shards))


def needs_universal(state: CheckpointState | None, world_size: int) -> bool:
    """Whether resuming ``state`` on ``world_size`` workers goes through the universal format (ZeRO shards of
    another world size; an unpartitioned ZeRO-0 checkpoint loads anywhere)."""
    return state is not None and state.sharded and state.world_size != world_size


@contextlib.contextmanager
def universal_copy(strategy: DeepSpeedStrategy, ckpt: str | Path, state: CheckpointState,
                   run_dir: str | Path) -> Iterator[tuple[str, str]]:
    """Rank 0 converts checkpoint ``ckpt`` into ``RUN_DIR/universal/<tag>-from-<W>``; every rank gets
    ``(folder, tag)`` to load from, and the copy is removed once every rank has loaded it. A failed conversion is
    agreed on by every rank (one all-reduce), so no rank waits forever."""
    from tract_dist.train.session import CheckpointError

    root = Path(run_dir) / UNIVERSAL_DIR
    tag = f"{state.tag}-from-{state.world_size}"
    error: BaseException | None = None
    if strategy.rank == 0:
        try:
            shutil.rmtree(root, ignore_errors=True)  # a copy left by a run that died while loading it
            strategy.to_universal(str(Path(ckpt) / state.tag), str(root / tag))
        except Exception as e:  # noqa: BLE001 - every rank must reach the agreement below
            error = e
    if not strategy.all_ranks_ok(error is None):
        cause = f"{type(error).__name__}: {error}" if error is not None else "a failure on rank 0"
        raise CheckpointError(f"checkpoint {ckpt} ({state.world_size} workers) could not be converted to DeepSpeed's "
                              f"universal format for {strategy.world_size} workers ({cause})") from error
    yield str(root), tag
    strategy.barrier()  # every rank has read its partition
    if strategy.rank == 0:
        shutil.rmtree(root, ignore_errors=True)
