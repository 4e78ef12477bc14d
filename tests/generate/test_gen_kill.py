"""A generation job killed (SIGKILL) after its first shard lands resumes to exactly one output per CoT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from tract_dist.generate.shards import read_generated

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_sigkill_midway_then_resume(tiny_export, quickstart_data, tmp_path):
    out = tmp_path / "out"
    overrides = [f"model.name_or_path={tiny_export}", f"data.train_path={quickstart_data}",
                 "data.train_format=jsonl", "data.max_length=640", "data.max_examples=12",
                 "generation.max_new_tokens=16", "generation.num_cots=2", "generation.batch_size=2",
                 "generation.shard_size=2", "generation.ray=false", "tracking.enabled=false"]
    cfg_file = tmp_path / "gen.yaml"
    cfg_file.write_text("model:\n  name_or_path: x\n")
    cmd = [sys.executable, "-m", "tract_dist.cli", "generate", str(cfg_file), "--output-dir", str(out),
           "--no-progress", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 180
        while not list(out.glob("part-*.jsonl")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    shards_at_kill = sorted(out.glob("part-*.jsonl"))
    assert 1 <= len(shards_at_kill) < 12, "the kill did not land midway"

    from tract_dist.config import load_config
    from tract_dist.generate.pipeline import GenerateSpec, generate_cots

    summary = generate_cots(GenerateSpec.of(load_config(cfg_file, overrides)), tiny_export, out, show_progress=False)
    counts = Counter(r["uid"] for r in read_generated(out))
    assert set(counts) == {f"{i}#cot{j}" for i in range(12) for j in range(2)}
    assert set(counts.values()) == {1}
    assert summary["missing"] == 0 and summary["duplicates"] == 0 and summary["committed"] == 24
    assert 0 < summary["this_run"]["generated_this_run"] < 24
    assert not list(out.glob(".*.tmp"))
