"""Where a worker reports metrics and checkpoints: Ray Train when it runs under Ray, plain files otherwise.

The worker loop is one function for both launchers; only these few calls differ. A save is three calls:
``begin(step)`` gives the folder every rank writes its ZeRO shards into, ``commit`` publishes it once every
rank succeeded, ``abort`` removes it when any rank failed (the worker agrees on success with one all-reduce,
so a rank that hit ENOSPC never leaves the others waiting in a barrier).

Every checkpoint carries a manifest per rank (``manifest_rank{r}.json``: step, the run's fingerprint, every
file it wrote with its size). Resuming checks it: a checkpoint of another configuration (fingerprint differs)
is refused naming both, and a file that is missing or has the wrong size (a broken shard) is named; the
torchrun session then falls back to the previous good checkpoint, Ray Train's has only its latest one.

Under Ray every rank saves its files straight into the checkpoint's folder in the run's storage when that storage
is a local (or mounted) filesystem, and reports it without an upload (``CheckpointUploadMode.NO_UPLOAD``: a
ZeRO-3 checkpoint of even a 135M model is 1.6 GB, which a temporary copy would write twice); on remote storage
(s3://...) into a local temporary folder that Ray Train uploads. Either way Ray Train registers the checkpoint only
when every rank reported it, and keeps ``num_to_keep`` of them. Under
torchrun the ranks write into ``tmp-step-N`` on shared storage; rank 0 writes ``COMPLETE``, fsyncs the folder
and renames it to ``step-N`` (``fsutil.publish_dir``), atomically rewrites the ``latest`` pointer and prunes the oldest checkpoints beyond ``keep``,
never one holding a ``PINNED`` marker (the last good checkpoint before a non-finite loss).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch.distributed as dist

from tract_dist.console import TERMINAL_ERR
from tract_dist.errors import RunFailure, TractError
from tract_dist.fsutil import atomic_write_json, atomic_write_text, publish_dir

log = logging.getLogger(__name__)

_DONE = "COMPLETE"
PINNED = "PINNED"


class StaleResumeError(TractError, RuntimeError):
    """A checkpoint (or run folder) was made with another configuration than the one resuming it."""


class CheckpointError(RunFailure, RuntimeError):
    """A checkpoint could not be written or read back; the message names the checkpoint (and file)."""


class TrainingSession(Protocol):
    """What a recipe asks of the launcher it runs under (:class:`LocalSession`, :class:`RaySession`): where metrics
    are reported and checkpoints kept. A save is ``begin`` -> every rank writes -> ``commit`` (or ``abort``)."""

    launcher: str  # "local" or "ray": named in the non-finite stop's message and record
    fingerprint: str | None  # the run's configuration digest, recorded in and checked against every checkpoint
    last_good: str | None  # the newest checkpoint this run can rely on (resumed or written), for error messages

    def report(self, metrics: dict[str, Any]) -> None:
        """Metrics of a step without a checkpoint."""

    def begin(self, step: int) -> str:
        """The folder every rank writes the checkpoint of ``step`` into (every rank calls it)."""

    def abort(self) -> None:
        """Remove the pending checkpoint: some rank failed to write it (every rank calls it)."""

    def commit(self, ckpt: str, step: int, metrics: dict[str, Any]) -> None:
        """Publish ``ckpt`` once every rank wrote it (every rank calls it)."""

    def pin(self, ckpt: str, reason: str) -> None:
        """Keep ``ckpt`` out of reach of later pruning (the last good one before a non-finite stop)."""

    def resume_dir(self) -> contextlib.AbstractContextManager[str | None]:
        """The verified checkpoint folder to resume from while the context lasts, or None to start afresh."""


def _warn(msg: str) -> None:
    log.warning(f"[train] warning: {msg}", extra=TERMINAL_ERR)


def write_manifest(ckpt: str | Path, rank: int, step: int, fingerprint: str | None) -> None:
    """Record every file under ``ckpt`` (relative names and sizes), the step and the run fingerprint."""
    root = Path(ckpt)
    entries = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
               if p.is_file() and not p.name.startswith(("manifest_rank", ".", _DONE, PINNED))}
    atomic_write_json(root / f"manifest_rank{rank}.json",
                      {"step": step, "rank": rank, "fingerprint": fingerprint, "files": entries})


def verify_checkpoint(ckpt: str | Path, fingerprint: str | None) -> int | None:
    """Check every manifest of ``ckpt``; return its step (None for a checkpoint without manifests, written by
    an older version). Raises StaleResumeError (other fingerprint) or CheckpointError (missing or short file)."""
    root = Path(ckpt)
    manifests = sorted(root.glob("manifest_rank*.json"))
    if not manifests:
        return None
    step = None
    for m in manifests:
        try:
            info = json.loads(m.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{m}: checkpoint manifest is unreadable ({e})") from None
        if fingerprint and info.get("fingerprint") and info["fingerprint"] != fingerprint:
            raise StaleResumeError(
                f"checkpoint {root} was written by a run with fingerprint {info['fingerprint']}, but this "
                f"configuration's fingerprint is {fingerprint}: resuming would mix two different runs. Use another "
                "run name, or --fresh to move the old run aside and start again")
        for rel, size in info.get("files", {}).items():
            p = root / rel
            if not p.is_file():
                raise CheckpointError(f"{p}: checkpoint file is missing (checkpoint {root})")
            if p.stat().st_size != size:
                raise CheckpointError(f"{p}: checkpoint file has {p.stat().st_size} bytes, its manifest says "
                                      f"{size} (a broken or truncated shard; checkpoint {root})")
        step = info.get("step", step)
    return step


class LocalSession:
    """torchrun (or single process): checkpoints under ``root`` with atomic publication."""

    launcher = "local"

    def __init__(self, root: str | Path, keep: int = 2, fingerprint: str | None = None):
        self.root = Path(root)
        self.keep = keep
        self.fingerprint = fingerprint
        self.last_good: str | None = None  # the newest checkpoint this run can rely on (resumed or written)

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def report(self, metrics: dict[str, Any]) -> None:
        del metrics  # console + MLflow already have them; nothing else to tell

    def begin(self, step: int) -> str:
        tmp = self.root / f"tmp-step-{step}"
        self._pending = tmp
        error = None
        if self.rank == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:  # raised after the barrier, so no rank waits for rank 0 forever
                error = e
        _barrier()
        if error is not None:
            raise error
        return str(tmp)

    def abort(self) -> None:
        """Every rank knows the save failed; rank 0 removes the partial folder (``latest`` is untouched)."""
        if self.rank == 0 and getattr(self, "_pending", None) is not None:
            shutil.rmtree(self._pending, ignore_errors=True)
        _barrier()

    def commit(self, ckpt: str, step: int, metrics: dict[str, Any]) -> None:
        del metrics
        tmp = Path(ckpt)
        final = self.root / f"step-{step}"
        if self.rank == 0:  # every rank's shards are in (the worker's all-reduce of the save status came first)
            write_manifest(tmp, 0, step, self.fingerprint)
            atomic_write_text(tmp / _DONE, str(step))
            publish_dir(tmp, final)  # every shard on disk before the folder gets its final name
            atomic_write_text(self.root / "latest", final.name)
            unpinned = [p for p in sorted(self._complete(), key=_step_of) if not (p / PINNED).exists()]
            for old in unpinned[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.last_good = str(final)
        _barrier()

    def pin(self, ckpt: str, reason: str) -> None:
        """Keep ``ckpt`` whatever later saves prune (rank 0 only writes)."""
        if self.rank == 0 and Path(ckpt).is_dir():
            atomic_write_text(Path(ckpt) / PINNED, reason + "\n")

    def _complete(self) -> list[Path]:
        return [p for p in self.root.glob("step-*") if (p / _DONE).exists() and _step_of(p) >= 0]

    def candidates(self) -> list[Path]:
        """Complete checkpoints, the one ``latest`` names first, then newest first."""
        done = sorted(self._complete(), key=_step_of, reverse=True)
        pointer = self.root / "latest"
        if pointer.exists():
            try:
                name = pointer.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                name = ""
            target = self.root / name if name and "/" not in name and name not in (".", "..") else None
            if target is not None and target in done:
                done.remove(target)
                done.insert(0, target)
            elif self.rank == 0:
                fallback = f"falling back to {done[0].name}" if done else "no complete checkpoint to fall back to"
                _warn(f"{pointer} names {name!r}, which is not a complete checkpoint; {fallback}")
        return done

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[str | None]:
        for ckpt in self.candidates():
            try:
                verify_checkpoint(ckpt, self.fingerprint)
            except CheckpointError as e:
                if self.rank == 0:
                    _warn(f"{e}; trying the previous checkpoint")
                continue
            self.last_good = str(ckpt)
            yield str(ckpt)
            return
        yield None


class RaySession:
    """Ray Train: ``ray.train.report`` with a per-rank checkpoint folder; resume from ``get_checkpoint``."""

    launcher = "ray"

    def __init__(self, fingerprint: str | None = None) -> None:
        import ray.train

        self._train = ray.train
        self.fingerprint = fingerprint
        self.last_good: str | None = None

    def report(self, metrics: dict[str, Any]) -> None:
        self._train.report(metrics)

    def begin(self, step: int) -> str:
        self._pending: str | None = None
        folder = self._storage_folder(step)
        self._direct = folder is not None
        if folder is None:
            self._pending = tempfile.mkdtemp(prefix=f"tract-ckpt-{step}-")
            return self._pending
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:  # a folder of this step can only be a dead attempt's partial one (resuming starts after the
            shutil.rmtree(folder, ignore_errors=True)  # registered checkpoint): never mix its files with ours
        _barrier()
        folder.mkdir(parents=True, exist_ok=True)
        self._pending = str(folder)
        return self._pending

    def _storage_folder(self, step: int) -> Path | None:
        """``<storage>/<run>/checkpoint_step-N`` when the run's storage is a local filesystem, else None."""
        try:
            import pyarrow.fs

            storage = self._train.get_context().get_storage()
            if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
                return None
            return Path(storage.experiment_fs_path) / f"checkpoint_step-{step:06d}"
        except Exception:  # noqa: BLE001 - a Ray without this developer API: the upload path
            return None

    def abort(self) -> None:
        if not getattr(self, "_pending", None):
            return
        if not self._direct:
            shutil.rmtree(self._pending, ignore_errors=True)
            return
        if (dist.get_rank() if dist.is_initialized() else 0) == 0:  # never registered: Ray knows nothing of it
            shutil.rmtree(self._pending, ignore_errors=True)
        _barrier()

    def commit(self, ckpt: str, step: int, metrics: dict[str, Any]) -> None:
        from ray.train import Checkpoint, CheckpointUploadMode

        write_manifest(ckpt, dist.get_rank() if dist.is_initialized() else 0, step, self.fingerprint)
        if self._direct:  # already in the run's storage: registered once every rank reported it
            self._train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt),
                               checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        else:
            try:
                self._train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt))
            finally:
                shutil.rmtree(ckpt, ignore_errors=True)  # uploaded (or failed): the local copy goes either way
        self.last_good = f"Ray Train checkpoint of step {step}"

    def pin(self, ckpt: str, reason: str) -> None:
        del ckpt, reason  # the driver pins Ray checkpoints (it knows their storage)

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[str | None]:
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            step = verify_checkpoint(d, self.fingerprint)  # Ray keeps no older one to fall back to
            self.last_good = f"Ray Train checkpoint {ckpt.path}" + (f" (step {step})" if step else "")
            yield d


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _step_of(p: Path) -> int:
    try:
        return int(p.name.split("-")[-1])
    except ValueError:
        return -1
