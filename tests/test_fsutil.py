"""The shared-file helpers: exclusive locks naming their holder, atomic writes that survive ENOSPC, and
writer-owned temporary names whose cleanup spares live writers."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tract_dist import fsutil, identity

HOLD = r"""
import sys, time
from tract_dist.fsutil import exclusive_lock
with exclusive_lock(sys.argv[1], "pipeline"):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.timeout(60)
def test_second_holder_is_refused_at_once_naming_pid_and_host(tmp_path):
    folder = tmp_path / "pipe"
    proc = _holder(folder)
    try:
        t0 = time.monotonic()
        with pytest.raises(fsutil.LockHeldError) as ei:
            with fsutil.exclusive_lock(folder, "pipeline"):
                pass
        assert time.monotonic() - t0 < 2  # at once, not after a timeout
        msg = str(ei.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in msg and str(folder) in msg
        assert ei.value.holder["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    # The kernel released the dead holder's lock: the folder is free again, with no manual cleanup.
    with fsutil.exclusive_lock(folder, "pipeline") as lock:
        assert lock == tmp_path / ".pipe.lock"
        assert fsutil.read_json(tmp_path / ".pipe.lock.holder", "holder")["pid"] == os.getpid()


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with fsutil.exclusive_lock(tmp_path / "gen", "generation folder"):
        with pytest.raises(fsutil.LockHeldError, match=f"pid {os.getpid()}"):
            with fsutil.exclusive_lock(tmp_path / "gen", "generation folder"):
                pass
    with fsutil.exclusive_lock(tmp_path / "gen", "generation folder"):  # released on exit
        pass


def test_atomic_write_keeps_the_old_file_on_enospc(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    fsutil.atomic_write_json(target, {"v": 1})
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        fsutil.atomic_write_json(target, {"v": 2})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert fsutil.read_json(target, "state") == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # the temp file went with the failure


def test_stale_temp_detection_spares_live_writers(tmp_path):
    live = fsutil.temp_path(tmp_path / "part.jsonl")  # this process: alive
    live.write_text("x")
    dead_proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True, check=True)
    dead_pid = int(dead_proc.stdout)
    dead = live.with_name(live.name.replace(f".{os.getpid()}.", f".{dead_pid}."))
    dead.write_text("x")
    assert fsutil.temp_owner(dead)[1] == dead_pid
    foreign = live.with_name(live.name.replace(live.name.split(".")[-4], "otherhost"))
    foreign.write_text("x")
    legacy = tmp_path / ".part-00001.jsonl.tmp"  # the layout before writer-owned names
    legacy.write_text("x")
    assert not fsutil.is_stale_temp(live)
    assert fsutil.is_stale_temp(dead)
    assert not fsutil.is_stale_temp(foreign)  # another host's writer cannot be checked: kept until old
    os.utime(foreign, (time.time() - 2 * 86400,) * 2)
    assert fsutil.is_stale_temp(foreign)
    assert fsutil.is_stale_temp(legacy)


def test_corrupt_json_names_the_file(tmp_path):
    p = tmp_path / "settings.json"
    p.write_text('{"model": "x"')
    with pytest.raises(fsutil.CorruptStateError, match=r"settings\.json: the settings is corrupt"):
        fsutil.read_json(p, "the settings")


def test_content_fingerprint_follows_the_weights_not_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACT_DIST_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x00" * 1000)
    first = identity.content_fingerprint(model)
    assert first == identity.content_fingerprint(model)  # cached, same answer
    (model / "model.safetensors").write_bytes(b"\x01" * 1000)  # retrained in place: same path, new weights
    os.utime(model / "model.safetensors", ns=(time.time_ns() + 10**9,) * 2)
    assert identity.content_fingerprint(model) != first
    assert identity.content_fingerprint("org/hub-model") is None


def test_durable_writes_fsync_and_cache_writes_do_not(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    fsutil.atomic_write_json(tmp_path / "state.json", {"v": 1})
    assert len(synced) >= 1  # the file (and, where the filesystem allows, its folder)
    synced.clear()
    fsutil.atomic_write_json(tmp_path / "cache.json", {"v": 1}, durable=False)
    assert synced == [] and fsutil.read_json(tmp_path / "cache.json", "cache") == {"v": 1}


def test_create_never_overwrites_an_existing_name(tmp_path):
    target = tmp_path / "part-00000.jsonl"
    fsutil.atomic_create_bytes(target, b"first\n")
    with pytest.raises(FileExistsError):
        fsutil.atomic_create_bytes(target, b"second\n")
    assert target.read_bytes() == b"first\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.jsonl"]  # no temp file left behind


def test_publish_dir_once_keeps_the_first_folder_and_cleans_up_after_failures(tmp_path):
    dest = tmp_path / "cache" / "tok-v2"

    def build(text):
        def write(tmp):
            assert tmp.parent == dest.parent and tmp.name.startswith(f".{dest.name}.")  # hidden, beside it
            (tmp / "tokenizer_config.json").write_text(text)
        return write

    def broken(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        fsutil.publish_dir_once(dest, broken)
    assert list(dest.parent.iterdir()) == []  # a failed build leaves no half folder
    assert fsutil.publish_dir_once(dest, build("first")) is True
    assert fsutil.publish_dir_once(dest, build("second")) is False  # another process finished first: kept
    assert (dest / "tokenizer_config.json").read_text() == "first"
    assert [p.name for p in dest.parent.iterdir()] == ["tok-v2"]
