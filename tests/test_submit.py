"""`tract-dist submit` against a real `ray start --head` bound to 127.0.0.1 (Ray Jobs API): run, status, logs, stop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tract_dist.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("migrated_mlflow_db")]
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A separate head node (own temp dir and ports), killed with its process group afterwards."""
    tmp = Path("/tmp") / f"ray-head-{os.getpid()}"  # short: Ray's socket paths have a length limit
    gcs, dash = _free_port(), _free_port()
    # Every agent port explicit: the suite's own local Ray already holds the defaults (e.g. 52365), and a
    # second head whose agent cannot bind answers "No available agent" forever.
    agent_ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                   f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
                   f"--ray-client-server-port={_free_port()}"]
    ray_bin = str(Path(sys.executable).parent / "ray")
    from tract_dist.runtime.ray_cluster import local_ray_env

    # Token authentication on (the suite's token, tests/conftest.py); every server on loopback.
    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ.get("RAY_AUTH_TOKEN_PATH")
    env = {**os.environ, **local_ray_env(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4", f"--temp-dir={tmp}",
         "--include-dashboard=true", "--object-store-memory=200000000", "--disable-usage-stats", *agent_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 90
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("ray head did not come up")
            time.sleep(1)
    # list_jobs answers before the node's job agent is up: wait until a trivial job really runs.
    client = JobSubmissionClient(address)
    while True:
        try:
            warm = client.submit_job(entrypoint="echo ready")
            break
        except RuntimeError:
            if time.monotonic() > deadline + 120:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("ray head's job agent did not come up")
            time.sleep(2)
    while client.get_job_status(warm).value not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(1)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)  # `ray start --block` took the full 30 s this once waited, then got the SIGKILL anyway
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # the whole group: the head's raylet, GCS and workers with it
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    shutil.rmtree(tmp, ignore_errors=True)


def _config(tmp: Path, data: Path, steps: int) -> Path:
    cfg = {
        "model": {"name_or_path": "tiny-llama", "tokenizer": "smollm2"},
        "data": {"train_path": str(data), "train_format": "jsonl", "max_length": 768, "max_examples": 8},
        "training": {"max_steps": steps, "micro_batch_size": 1, "save_steps": 1000},
        "pipeline": {"method": "cot_raft", "output_dir": str(tmp / "pipe")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db"},
        "cluster": {"num_workers": 1},  # the Jobs API is what this tests; two workers: tests/train
    }
    p = tmp / f"job-{steps}.yaml"
    p.write_text(json.dumps(cfg))  # JSON is YAML
    return p


@pytest.mark.timeout(400)
def test_submit_status_logs_and_stop(head, tmp_path, quickstart_data, capsys, monkeypatch):
    from tract_dist.submit import job_status, wait_for

    import urllib.error
    import urllib.request

    # The head's Jobs API refuses a request without the token ...
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(f"{head}/api/jobs/", timeout=10)
    assert ei.value.code == 401
    # ... and `submit` authenticates with it (RAY_AUTH_TOKEN_PATH).
    monkeypatch.chdir(REPO)
    assert main(["submit", "--address", head, "--wait", str(_config(tmp_path, quickstart_data, 2))]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "[submit] working_dir upload: " in captured.err and " files, " in captured.err
    job_id = out.splitlines()[0].strip()
    assert "[pipeline] train_stage1: running" in out and f"job {job_id}: SUCCEEDED" in out
    assert main(["job", "status", job_id, "--address", head]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"
    assert main(["job", "logs", job_id, "--address", head]) == 0
    assert "[train] step 2/2" in capsys.readouterr().out
    assert list((tmp_path / "pipe").glob("*/state.json"))

    assert main(["submit", "--address", head, str(_config(tmp_path, quickstart_data, 500))]) == 0
    long_id = capsys.readouterr().out.splitlines()[0].strip()
    assert wait_for(head, long_id, timeout_s=120, until={"RUNNING"}) == "RUNNING"
    assert main(["job", "stop", long_id, "--address", head]) == 0
    assert capsys.readouterr().out.strip() in ("stopped", "not running")
    assert wait_for(head, long_id, timeout_s=60) == "STOPPED"
    assert job_status(head, long_id) == "STOPPED"
