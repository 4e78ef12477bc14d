"""Where a worker reports metrics and checkpoints: Ray Train when it runs under Ray, plain files otherwise.

The worker loop is one function for both launchers; only these few calls differ. Under Ray every rank saves
its own ZeRO shards to a local folder and reports it (Ray Train persists all ranks' files into one
checkpoint and registers it only when every rank's upload finished, so an interrupted save never replaces
the last good checkpoint). Under torchrun the ranks write into ``tmp-step-N`` on shared storage and rank 0
renames it to ``step-N`` after a barrier, then atomically rewrites the ``latest`` pointer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch.distributed as dist

_DONE = "COMPLETE"


class LocalSession:
    """torchrun (or single process): checkpoints under ``root`` with atomic publication."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        del metrics, checkpoint_dir  # console + MLflow already have them; nothing else to tell

    @contextlib.contextmanager
    def checkpoint_dir(self, step: int) -> Iterator[str]:
        tmp = self.root / f"tmp-step-{step}"
        final = self.root / f"step-{step}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        yield str(tmp)
        _barrier()  # every rank has written its shards
        if self.rank == 0:
            (tmp / _DONE).write_text(str(step))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = self.root / "latest.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, self.root / "latest")
            for old in sorted(self._complete(), key=_step_of)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()

    def _complete(self) -> list[Path]:
        return [p for p in self.root.glob("step-*") if (p / _DONE).exists()]

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[str | None]:
        pointer = self.root / "latest"
        if pointer.exists() and (self.root / pointer.read_text().strip() / _DONE).exists():
            yield str(self.root / pointer.read_text().strip())
            return
        done = sorted(self._complete(), key=_step_of)
        yield str(done[-1]) if done else None


class RaySession:
    """Ray Train: ``ray.train.report`` with a per-rank checkpoint folder; resume from ``get_checkpoint``."""

    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        self._pending: str | None = None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        from ray.train import Checkpoint

        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=ckpt)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    @contextlib.contextmanager
    def checkpoint_dir(self, step: int) -> Iterator[str]:
        d = tempfile.mkdtemp(prefix=f"tract-ckpt-{step}-")
        yield d  # the caller reports it (with the step's metrics), which uploads and deletes it

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[str | None]:
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _step_of(p: Path) -> int:
    return int(p.name.split("-")[-1])
