"""vLLM generation killed midway resumes to exactly one output per CoT, equal to an uninterrupted run's: out of
the CI suite. Asserts, prints what it saw, exits 1 on a mismatch, 2 when vLLM is not usable.

The shard/resume logic is the backends' common code and the suite kills and resumes it on HF
(``tests/generate/test_gen_kill.py``); the suite also checks vLLM's per-request seeds give the same CoTs on two
replicas (``tests/runtime/test_vllm_generation.py``). What this adds is the whole process group of a vLLM job
(the CLI and vLLM's engine core) SIGKILLed mid-run, then resumed on vLLM: two more engine starts (~80 s of a
2-core machine), which the suite's 20-minute budget could not keep.

    python benchmarks/generate/check_vllm_kill_resume.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "quickstart" / "vicuna_eval_0-15.jsonl"


def _overrides(n_examples: int) -> list[str]:
    return ["model.name_or_path=smollm2", f"data.train_path={DATA}", "data.train_format=jsonl",
            "data.max_length=480", f"data.max_examples={n_examples}", "generation.max_new_tokens=6",
            "generation.num_cots=2", "generation.batch_size=2", "generation.shard_size=2", "generation.ray=false",
            "generation.backend=vllm", "tracking.enabled=false"]


def _cots(out: Path) -> dict[str, str]:
    from tract_dist.generate.shards import read_generated

    recs = read_generated(out)
    counts = Counter(r["uid"] for r in recs)
    assert set(counts.values()) == {1}, f"duplicated or missing CoTs: {counts}"
    return {r["uid"]: r["cot"] for r in recs}


def main() -> int:
    from tract_dist import console

    console.attach()  # an entry point: the library's console lines (logged) on this terminal
    from tract_dist.config import load_config
    from tract_dist.generate.pipeline import GenerateSpec, generate_cots
    from tract_dist.runtime.backend import vllm_status

    ok, detail = vllm_status()
    if not ok:
        print(f"check_vllm_kill_resume: vLLM is not usable: {detail}")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="vllm-kill-"))
    t0 = time.perf_counter()
    clean = generate_cots(GenerateSpec.of(load_config(None, _overrides(4))), None, tmp / "clean", show_progress=False)
    assert clean["backend"] == "vllm" and clean["ok"] + clean["failed"] == 8, clean
    clean_run = _cots(tmp / "clean")

    out, cfg_file = tmp / "out", tmp / "gen.yaml"
    cfg_file.write_text("model:\n  name_or_path: x\n")
    cmd = [sys.executable, "-m", "tract_dist.cli", "generate", str(cfg_file), "--output-dir", str(out),
           "--no-progress", *_overrides(4)]
    # its own session: the kill takes the job's whole process group (the CLI and vLLM's engine core)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=REPO)
    try:
        deadline = time.time() + 300
        while not list(out.glob("part-*.jsonl")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    at_kill = len(list(out.glob("part-*.jsonl")))
    assert 1 <= at_kill < 4, f"the kill did not land midway ({at_kill} of 4 shards)"
    summary = generate_cots(GenerateSpec.of(load_config(cfg_file, _overrides(4))), None, out, show_progress=False)
    assert summary["missing"] == summary["duplicates"] == 0 and summary["committed"] == 8, summary
    assert 0 < summary["this_run"]["generated_this_run"] < 8, summary["this_run"]
    assert _cots(out) == clean_run, "the resumed CoTs differ from the uninterrupted run's"
    print(f"check_vllm_kill_resume: ok ({at_kill} of 4 shards at the kill, "
          f"{summary['this_run']['generated_this_run']} CoTs generated on resume, all 8 equal to the clean run's; "
          f"{time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AssertionError as e:
        print(f"check_vllm_kill_resume: FAILED: {e}")
        sys.exit(1)
