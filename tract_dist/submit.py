"""Submit the pipeline to a Ray cluster through the Ray Jobs API, and follow or stop the job.

The Jobs API (served by the head's dashboard, ``ray[default]``) runs the entrypoint on the head node inside a
runtime environment: the working directory is uploaded (minus virtualenvs, run outputs and stores), extra
pip packages may be added, and environment variables are forwarded. No launcher of our own: Ray does it.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

# Never upload these with the working directory (large, local or secret-bearing).
WORKING_DIR_EXCLUDES = [".venv", ".git", "runs", "mlruns", "mlartifacts", "*.db", ".whl", ".gl", "__pycache__",
                        "*.egg-info", "outputs"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    if "://" not in address:
        address = f"http://{address}"
    return JobSubmissionClient(address)


def submit_pipeline(address: str, config: str, overrides: list[str] | tuple[str, ...] = (), *,
                    working_dir: str | None = ".", pip: list[str] | None = None,
                    env_vars: dict[str, str] | None = None, submission_id: str | None = None,
                    command: str = "pipeline") -> str:
    """Submit ``tract-dist <command> CONFIG [overrides]``; returns the job's submission id."""
    if not Path(config).is_file():
        raise FileNotFoundError(f"config {config} not found")
    entrypoint = " ".join(["tract-dist", command, shlex.quote(config), *map(shlex.quote, overrides)])
    runtime_env: dict[str, Any] = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", **(env_vars or {})}}
    if working_dir:
        runtime_env["working_dir"] = working_dir
        runtime_env["excludes"] = WORKING_DIR_EXCLUDES
    if pip:
        runtime_env["pip"] = pip
    client = _client(address)
    deadline = time.monotonic() + 120
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
        except RuntimeError as e:
            # A head that just started answers before its job agent is up; Ray itself says to try again.
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def job_status(address: str, job_id: str) -> str:
    return str(_client(address).get_job_status(job_id).value)


def job_logs(address: str, job_id: str) -> str:
    return _client(address).get_job_logs(job_id)


def stop_job(address: str, job_id: str) -> bool:
    return bool(_client(address).stop_job(job_id))


def wait_for(address: str, job_id: str, timeout_s: float = 3600, poll_s: float = 2.0,
             until: frozenset[str] | set[str] = frozenset(TERMINAL)) -> str:
    """Poll until the job reaches one of ``until`` (default: a terminal state); returns that state."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = job_status(address, job_id)
        if status in until or status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)
