"""Files that many processes share: atomic writes, writer-owned temporary names, and exclusive locks.

One helper module for every place that publishes a file (state, settings, shards, checkpoints' markers) or
must be the only writer of a folder (a pipeline, a training run, a generation folder):

- :func:`atomic_write_text` / :func:`atomic_write_json`: write a temporary file next to the target, fsync it,
  rename it over the target, fsync the folder. A reader sees the old file or the new one, never half of one;
  a failed write (ENOSPC, a kill) leaves the old file and removes its temporary file.
  :func:`atomic_create_bytes` publishes under a name that must be new (a hard link: never overwrites);
  :func:`publish_dir_once` builds a folder aside and renames it into place unless another process did first.
- :func:`temp_path` names a temporary file after its writer (host and pid), so cleaning up after a crash can
  tell a dead writer's file from a live one's (:func:`is_stale_temp`).
- :func:`exclusive_lock` holds an OS lock (``flock`` through ``filelock``) on ``.<folder name>.lock`` beside
  the folder for as long as a command runs (beside it, so ``--fresh`` may move the folder itself aside). A second invocation fails at once with :class:`LockHeldError` naming the
  holder (pid, host, command, since when), read from the holder record written beside the lock. The kernel
  releases the lock when its holder dies, however it dies, so a stale lock never blocks anyone; the holder
  record of a dead process is simply overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from tract_dist.errors import TractError

_HOST = socket.gethostname()
_HOST_TAG = re.sub(r"[^A-Za-z0-9-]", "-", _HOST) or "host"  # no dots: temp names are parsed from the right


class LockHeldError(TractError, RuntimeError):
    """Another process holds the lock of a folder this command must write alone."""

    def __init__(self, what: str, path: Path, holder: dict[str, Any] | None):
        self.path = path
        self.holder = holder or {}
        if holder:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            who = (f"pid {holder.get('pid')} on host {holder.get('host')} since {since} "
                   f"({' '.join(holder.get('argv', []))[:200]})")
        else:
            who = "another process (its holder record is not written yet)"
        folder = path.with_name(path.name[1:-len(".lock")])
        super().__init__(f"{what} {folder} is in use by {who}; wait for it to finish or stop it "
                         f"(lock file {path})")


def host() -> str:
    return _HOST


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def temp_path(final: Path) -> Path:
    """A hidden temporary name beside ``final`` that only this process uses: ``.NAME.HOST.PID.RANDOM.tmp``."""
    return final.with_name(f".{final.name}.{_HOST_TAG}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def temp_owner(path: Path) -> tuple[str, int] | None:
    """(host tag, pid) of a :func:`temp_path` name; None for other names (e.g. an older ``.NAME.tmp``)."""
    parts = path.name.split(".")
    if len(parts) < 6 or parts[0] != "" or parts[-1] != "tmp" or not parts[-3].isdigit():
        return None
    return parts[-4], int(parts[-3])


def is_stale_temp(path: Path, *, foreign_after_s: float = 24 * 3600) -> bool:
    """Whether a temporary file was left by a writer that is gone.

    Ours (this host): stale when its pid is no longer alive. Another host's: stale only once it is older than
    ``foreign_after_s`` (its writer cannot be checked from here). Names without an owner (an older layout):
    stale, as before."""
    owner = temp_owner(path)
    if owner is None:
        return True
    who, pid = owner
    if who == _HOST_TAG:
        return pid != os.getpid() and not pid_alive(pid)
    try:
        return time.time() - path.stat().st_mtime > foreign_after_s
    except FileNotFoundError:
        return False


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened for fsync
        fd = os.open(str(d), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_temp(path: Path, data: bytes, durable: bool) -> Path:
    """``data`` in a new :func:`temp_path` beside ``path`` (fsynced when ``durable``); removed if writing fails."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (temp file, rename) and, by default, durably (fsync the file
    before the rename and the folder after it).

    Durable by default because what this project publishes is state that a rerun trusts (pipeline state,
    generation settings and summaries, predictions, checkpoint markers): without the fsync a power loss can
    leave the new name pointing at an empty file. ``durable=False`` is for caches that are rebuilt when they
    do not parse (it saves a disk flush per write)."""
    path = Path(path)
    tmp = _write_temp(path, data, durable)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      durable: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n",
                      durable=durable)


def atomic_write_jsonl(path: str | Path, records: Any, *, durable: bool = True) -> None:
    """One JSON object per line (UTF-8, non-ASCII kept), replaced atomically like :func:`atomic_write_bytes`."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), durable=durable)


def atomic_create_bytes(path: str | Path, data: bytes) -> None:
    """Publish ``data`` under a name that must be new: temp file, fsync, hard link, fsync folder.

    Unlike :func:`atomic_write_bytes` an existing ``path`` is never replaced: ``FileExistsError`` is raised
    instead, so two writers choosing the same name (the next free shard number) never overwrite each other;
    the loser picks another name. Durable: a shard is what a resumed run counts as done."""
    path = Path(path)
    tmp = _write_temp(path, data, durable=True)
    try:
        os.link(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    _fsync_dir(path.parent)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under ``root``: what a writer (torch.save, safetensors) left in the page
    cache reaches the disk before a marker or a rename publishes it (a power loss cannot publish empty files)."""
    root = Path(root)
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


def publish_dir(tmp: str | Path, final: str | Path) -> None:
    """Publish a folder written under a temporary name: fsync its content, replace ``final`` (a previous
    folder there is removed first: a folder cannot be renamed over a non-empty one), fsync the parent."""
    import shutil

    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def publish_dir_once(final: str | Path, build: Callable[[Path], object]) -> bool:
    """Build a folder that several processes may build at the same time (a converted model or tokenizer in
    the cache) and publish the first one to finish; True when this call's folder was published.

    ``build(tmp)`` writes into a writer-owned temporary folder beside ``final`` (a failing build removes it).
    The folder is fsynced before the rename because the cache is trusted by its presence on the next run: a
    power loss must not publish empty files. When ``final`` already exists (another replica finished first;
    its content is the same) this call's folder is discarded, never renamed over it."""
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    tmp.mkdir()
    try:
        build(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, final)  # a folder is renamed over an empty folder only: a finished one stays
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    _fsync_dir(final.parent)
    return True


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file this project wrote; a corrupt or unreadable one raises :class:`CorruptStateError`
    naming the file (never a bare JSONDecodeError)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptStateError(f"{path}: {what} is corrupt ({type(e).__name__}: {e}); restore it or remove "
                                f"it to start that part afresh") from None


def decode_utf8(data: bytes) -> str:
    """UTF-8 text (a byte-order mark is accepted). UTF-16 and legacy encodings raise ``UnicodeError`` with a
    message that says which and how to fix it; callers add the file name and their own error type."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:4096]:
        raise UnicodeError("the file is UTF-16 text (a byte-order mark or NUL bytes); save it as UTF-8 "
                           "(e.g. iconv -f UTF-16 -t UTF-8)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UnicodeError(f"not UTF-8 text: byte 0x{data[e.start]:02x} on line {line} (offset {e.start}); a "
                           "latin-1 / Windows-1252 file? save it as UTF-8") from None


class CorruptStateError(TractError, RuntimeError):
    """A state file this project wrote cannot be read back; the message names it."""


def _cache_dir() -> Path:
    """The project's cache root (``TRACT_DIST_CACHE``): content hashes, node-local copies of published folders."""
    return Path(os.environ.get("TRACT_DIST_CACHE", Path.home() / ".cache" / "tract-dist"))


def lock_path(folder: str | Path) -> Path:
    folder = Path(folder).resolve()
    return folder.with_name(f".{folder.name}.lock")


@contextlib.contextmanager
def exclusive_lock(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold ``folder``'s lock for the body; raise :class:`LockHeldError` at once if another process holds it."""
    from filelock import FileLock, Timeout

    folder = Path(folder).resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(folder)
    holder_file = path.with_name(path.name + ".holder")
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = None
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads(holder_file.read_text(encoding="utf-8"))
        raise LockHeldError(what, path, holder) from None
    try:
        atomic_write_json(holder_file, {"pid": os.getpid(), "host": _HOST, "since": time.time(),
                                        "argv": sys.argv})
        yield path
    finally:
        with contextlib.suppress(OSError):
            holder_file.unlink()
        lock.release()
