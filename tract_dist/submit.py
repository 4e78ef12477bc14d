"""Submit the pipeline to a Ray cluster through the Ray Jobs API, and follow or stop the job.

The Jobs API (served by the head's dashboard, ``ray[default]``) runs the entrypoint on the head node inside a
runtime environment: the working directory is uploaded, extra pip packages may be added, and environment
variables are forwarded. No launcher of our own: Ray does it.

Before anything is sent: the config is validated here (a typo fails in a second, not after the upload and a
cluster start-up); the upload is listed with Ray's own walker (``.gitignore``, ``.rayignore``, Ray's default
excludes and ours), its file count and size printed, and more than ``max_upload_mb`` is refused without
``force``. Secrets and bulk never travel (:data:`WORKING_DIR_EXCLUDES`). The client authenticates with the
cluster's token when one is configured (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tract_dist.console import CONSOLE_ERR
from tract_dist.errors import TractError

log = logging.getLogger(__name__)

# Never uploaded with the working directory (gitignore patterns, relative to it): secrets first, then bulk.
SECRET_EXCLUDES = [
    ".env", ".env.*", ".envrc", "*.env", ".netrc", "_netrc", ".git-credentials", ".pypirc", ".npmrc",
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".ssh/", ".aws/", ".azure/", ".gcloud/", ".kube/",
    ".docker/", ".ray/", ".huggingface/", ".cache/", "*.pem", "*.key", "*.p12", "*.pfx", "*.keystore", "*.jks",
    "token", "*.token", "auth_token", "hf_token", ".hf_token", "credentials", "credentials.json", "secrets.*",
    "*.secret", "*.secrets",
]
BULK_EXCLUDES = [
    ".git/", ".venv/", "venv/", ".venv-*/", "__pycache__/", "*.egg-info/", ".pytest_cache/", "mlflow.db*", "*.db",
    "*.sqlite", "mlruns/", "mlartifacts/", "runs/", "outputs/", "checkpoints/", "checkpoint_*/", "tmp-step-*/",
    "*.pt", "*.pth", "*.ckpt", "*.safetensors", "*.gguf", "*.whl", ".whl/", ".gl/", "*.tar.gz", "*.zip",
]
WORKING_DIR_EXCLUDES = SECRET_EXCLUDES + BULK_EXCLUDES
DEFAULT_MAX_UPLOAD_MB = 50
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(TractError, ValueError):
    """The job cannot be submitted as asked (too big an upload, a cluster that refuses the token)."""


@dataclass
class UploadPlan:
    root: Path
    files: list[Path] = field(default_factory=list)
    total_bytes: int = 0

    def describe(self) -> str:
        return f"{len(self.files)} files, {self.total_bytes / 2**20:.2f} MiB from {self.root}"


def plan_upload(working_dir: str | Path, excludes: list[str] | None = None) -> UploadPlan:
    """The files Ray will upload as the job's working_dir, found by Ray's own walker with the same rules
    (its default excludes, ``.gitignore`` / ``.rayignore`` and ``excludes``)."""
    import os

    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(working_dir).resolve()
    patterns = ray_constants.get_runtime_env_default_excludes() + list(excludes or WORKING_DIR_EXCLUDES)
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    plan = UploadPlan(root)

    def handler(p: Path) -> None:
        if p.is_file():
            plan.files.append(p)
            plan.total_bytes += p.stat().st_size

    _dir_travel(root, [_get_excludes(root, patterns)], handler, include_gitignore=include_gitignore)
    return plan


def _enable_token_auth_if_configured() -> None:
    """Ray's client sends the cluster token only in token mode; turn it on when a token is configured (the
    rule ``ray start`` itself uses). RAY_AUTH_MODE set by the user is respected."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    if "://" not in address:
        address = f"http://{address}"
    _enable_token_auth_if_configured()
    try:
        return JobSubmissionClient(address)
    except (RuntimeError, ConnectionError) as e:
        text = str(e)
        if "401" in text or "403" in text or "Authentication" in text:
            raise SubmitError(f"{address} refused this client's Ray token: {text.splitlines()[0]}. Set "
                              "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token "
                              "(`ray get-auth-token` on the head)") from None
        if "Failed to connect" in text or "Connection" in text:
            raise SubmitError(f"cannot reach the Ray dashboard at {address}: {text.splitlines()[0]}") from None
        raise


def submit_pipeline(address: str, config: str, overrides: list[str] | tuple[str, ...] = (), *,
                    working_dir: str | None = ".", pip: list[str] | None = None,
                    env_vars: dict[str, str] | None = None, submission_id: str | None = None,
                    command: str = "pipeline", max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, force: bool = False,
                    excludes: list[str] | None = None, no_plan_check: bool = False) -> str:
    """Submit ``tract-dist <command> CONFIG [overrides]``; returns the job's submission id.

    The config (with overrides) is validated first; the upload is listed and refused above ``max_upload_mb``
    unless ``force``; ``excludes`` are added to :data:`WORKING_DIR_EXCLUDES`."""
    from tract_dist.config import load_config

    load_config(config, list(overrides))  # ConfigError naming the file and key, before anything is sent
    flags = ["--no-plan-check"] if no_plan_check and command in ("train", "pipeline") else []
    entrypoint = " ".join(["tract-dist", command, *flags, shlex.quote(config), *map(shlex.quote, overrides)])
    runtime_env: dict[str, Any] = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", **(env_vars or {})}}
    if working_dir:
        patterns = WORKING_DIR_EXCLUDES + list(excludes or [])
        plan = plan_upload(working_dir, patterns)
        log.info(f"[submit] working_dir upload: {plan.describe()}", extra=CONSOLE_ERR)  # stdout: the job id
        if plan.total_bytes > max_upload_mb * 2**20 and not force:
            biggest = sorted(plan.files, key=lambda p: p.stat().st_size, reverse=True)[:5]
            listed = ", ".join(f"{p.relative_to(plan.root)} ({p.stat().st_size / 2**20:.1f} MiB)" for p in biggest)
            raise SubmitError(f"the working_dir upload is {plan.total_bytes / 2**20:.1f} MiB, over the "
                              f"{max_upload_mb:g} MiB limit (largest: {listed}); exclude them (--exclude, "
                              ".rayignore) or pass --force")
        runtime_env["working_dir"] = working_dir
        runtime_env["excludes"] = patterns
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
