"""Generation folders under faults: failed CoTs retried on a rerun, shard names exclusive to their writer,
stale-temp cleanup sparing live writers, a model retrained in place, corrupt settings and shards, a second
invocation on the same folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from gen_helpers import gen_config

from tract_dist.data.schema import DataError
from tract_dist.fsutil import CorruptStateError, LockHeldError, exclusive_lock, temp_path
from tract_dist.generate import pipeline
from tract_dist.generate.shards import ShardStore, StaleGenerationError, read_generated
from tract_dist.runtime.hf_engine import HFEngine as Engine

pytestmark = [pytest.mark.timeout(240)]


def _cfg(model, data, tmp, *extra):
    return gen_config(model, data, tmp, "data.max_examples=3", "generation.num_cots=1", "tracking.enabled=false",
                      *extra)


def _spec(model, data, tmp, *extra):
    return pipeline.GenerateSpec.of(_cfg(model, data, tmp, *extra))


def test_failed_generations_are_retried_on_a_rerun(tiny_export, quickstart_data, tmp_path, monkeypatch):
    real = Engine.generate
    broken = {"on": True}

    def flaky(self, prompts, seeds, params):
        if broken["on"]:
            raise RuntimeError("replica lost (simulated)")
        return real(self, prompts, seeds, params)

    monkeypatch.setattr(Engine, "generate", flaky)
    out = tmp_path / "out"
    s = pipeline.generate_cots(_spec(tiny_export, quickstart_data, tmp_path, "generation.max_attempts=1"),
                               tiny_export, out, show_progress=False)
    assert s["ok"] == 0 and s["failed"] == 3 and s["failed_final"] == 3  # out of attempts for this run
    broken["on"] = False
    s = pipeline.generate_cots(_spec(tiny_export, quickstart_data, tmp_path, "generation.max_attempts=2"),
                               tiny_export, out, show_progress=False)
    assert s["ok"] == 3 and s["failed"] == 0 and s["retried"] == 3 and s["missing"] == 0
    assert s["this_run"]["generated_this_run"] == 3
    by_uid = {}
    for r in read_generated(out):
        by_uid.setdefault(r["uid"], []).append((r["attempt"], r["status"]))
    assert all(v == [(1, "failed"), (2, "ok")] for v in by_uid.values())
    # a third run has nothing left to do
    s = pipeline.generate_cots(_spec(tiny_export, quickstart_data, tmp_path, "generation.max_attempts=5"),
                               tiny_export, out, show_progress=False)
    assert s["this_run"]["generated_this_run"] == 0


def test_shard_names_are_exclusive_to_their_writer(tmp_path, monkeypatch):
    store = ShardStore(tmp_path)
    real_link = os.link
    raced = []

    def another_writer_first(src, dst):
        if not raced:  # between choosing part-00000 and publishing it, another writer publishes that name
            (tmp_path / os.path.basename(dst)).write_text('{"uid": "other#cot0", "status": "ok"}\n')
            raced.append(dst)
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", another_writer_first)
    path = store.write_shard([{"uid": "mine#cot0", "status": "ok"}])
    assert path.name == "part-00001.jsonl" and str(raced[0]).endswith("part-00000.jsonl")
    assert {r["uid"] for r in store.records()} == {"other#cot0", "mine#cot0"}  # nothing overwritten
    assert not list(tmp_path.glob(".*.tmp"))


def test_stale_temp_cleanup_never_removes_a_live_writers_file(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = temp_path(tmp_path / "part.jsonl")
        live = mine.with_name(mine.name.replace(f".{os.getpid()}.", f".{sleeper.pid}."))
        done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
        dead = mine.with_name(mine.name.replace(f".{os.getpid()}.", f".{int(done.stdout)}."))
        for p in (live, dead):
            p.write_text("half a shard")
        assert ShardStore(tmp_path).remove_stale() == 1
        assert live.exists() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_model_retrained_in_place_is_refused_by_content_hash(tiny_export, quickstart_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACT_DIST_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(tiny_export, model)
    cfg = _cfg(str(model), quickstart_data, tmp_path)
    out = tmp_path / "out"
    pipeline.generate_cots(pipeline.GenerateSpec.of(cfg), str(model), out, show_progress=False)
    before = json.loads((out / "settings.json").read_text())
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # "retrained": same path, other weights
    weights.write_bytes(bytes(data))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a coarse clock must not hide the rewrite
    with pytest.raises(StaleGenerationError) as ei:
        pipeline.generate_cots(pipeline.GenerateSpec.of(cfg), str(model), out, show_progress=False)
    msg = str(ei.value)
    assert "model_sha256" in msg and before["fingerprint"] in msg and before["model_sha256"] in msg


def test_fresh_moves_the_old_cots_aside(tiny_export, quickstart_data, tmp_path):
    out = tmp_path / "out"
    pipeline.generate_cots(_spec(tiny_export, quickstart_data, tmp_path), tiny_export, out, show_progress=False)
    cfg = _cfg(tiny_export, quickstart_data, tmp_path, "generation.temperature=0.5")
    with pytest.raises(StaleGenerationError):
        pipeline.generate_cots(pipeline.GenerateSpec.of(cfg), tiny_export, out, show_progress=False)
    s = pipeline.generate_cots(pipeline.GenerateSpec.of(cfg), tiny_export, out, show_progress=False, fresh=True)
    assert s["ok"] + s["failed"] == 3 and s["this_run"]["generated_this_run"] == 3
    old = [p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]
    assert len(old) == 1 and len(read_generated(old[0])) == 3


def test_corrupt_settings_and_shards_are_named(tiny_export, quickstart_data, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(tiny_export, quickstart_data, tmp_path)
    pipeline.generate_cots(pipeline.GenerateSpec.of(cfg), tiny_export, out, show_progress=False)
    shard = sorted(out.glob("part-*.jsonl"))[0]
    good = shard.read_text()
    shard.write_text("{broken\n" + good)  # damaged after it was committed
    with pytest.raises(DataError, match=rf"{shard.name}, record 0: line 1 of a committed shard is not valid JSON"):
        pipeline.generate_cots(pipeline.GenerateSpec.of(cfg), tiny_export, out, show_progress=False)
    shard.write_text(good)
    (out / "settings.json").write_text('{"model": ')
    with pytest.raises(CorruptStateError, match=r"settings\.json: the generation settings are corrupt"):
        pipeline.generate_cots(pipeline.GenerateSpec.of(cfg), tiny_export, out, show_progress=False)


def test_second_invocation_on_a_generation_folder_is_refused(tiny_export, quickstart_data, tmp_path):
    out = tmp_path / "out"
    with exclusive_lock(out, "generation folder"):
        with pytest.raises(LockHeldError, match=f"generation folder {out} is in use by pid {os.getpid()}"):
            pipeline.generate_cots(_spec(tiny_export, quickstart_data, tmp_path), tiny_export, out,
                                   show_progress=False)
