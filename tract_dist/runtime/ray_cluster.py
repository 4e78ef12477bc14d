"""The one place that connects to Ray or starts a local one, for training, generation and evaluation.

A local Ray gets logical CPUs (at least 4 and one more than its actors need): on 2 cores, actors holding every
CPU starve Ray Data's read tasks and deadlock silently (STACK-NOTES). The dashboard is bound to 127.0.0.1; it
serves the State API that Ray Train's placement-group cleaner polls (without it every run logs a warning each
second, and a State API that answers nothing makes the cleaner think the run's controller died and remove
the placement group under a live run: seen on a loaded 2-core machine) and lets users watch the run locally.
"""

from __future__ import annotations

import os


def init_ray(address: str | None = None, *, num_cpus: int | None = None, need_cpus: float = 0,
             object_store_memory_mb: int = 256, env_vars: dict[str, str] | None = None,
             log_to_driver: bool = True) -> None:
    """Connect to ``address`` / RAY_ADDRESS, or start a local Ray sized for this machine; no-op if connected."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": dict(env_vars)} if env_vars else None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside a submitted job the job's runtime env already applies; merge ours into it.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, runtime_env=runtime_env)
        return
    import math

    cpus = max(num_cpus or 0, math.ceil(need_cpus) + 1, 4)
    ray.init(num_cpus=cpus, object_store_memory=object_store_memory_mb << 20, include_dashboard=True,
             dashboard_host="127.0.0.1", runtime_env=runtime_env, log_to_driver=log_to_driver)
