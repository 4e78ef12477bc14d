"""The one place that connects to Ray or starts a local one, for training, generation and evaluation.

A local Ray gets logical CPUs (at least 4 and one more than its actors need): on 2 cores, actors holding every
CPU starve Ray Data's read tasks and deadlock silently (STACK-NOTES). The dashboard is bound to 127.0.0.1; it
serves the State API that Ray Train's placement-group cleaner polls (without it every run logs a warning each
second, and a State API that answers nothing makes the cleaner think the run's controller died and remove
the placement group under a live run: seen on a loaded 2-core machine) and lets users watch the run locally.

Security of a local Ray (Ray 2.60):
- Token authentication stays on. ``ray.init()`` without an address enables it by default and creates a token
  (``~/.ray/auth_token``, or the file ``RAY_AUTH_TOKEN_PATH`` names, or ``RAY_AUTH_TOKEN``); every gRPC and
  dashboard request of the cluster must carry it. This module never turns it off; ``RAY_AUTH_MODE=disabled``
  set by the user is respected, with a warning.
- Every server binds to 127.0.0.1. Ray's servers (GCS, raylet, workers, agents) listen on loopback only when
  the node's IP is 127.0.0.1, and on Linux Ray replaces a requested 127.0.0.1 with the machine's routable
  address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the single-machine mode Ray uses on macOS and
  Windows), which is set for the local cluster here, so nothing of it is reachable from the network.
"""

from __future__ import annotations

import os
import sys

LOOPBACK = "127.0.0.1"
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def local_ray_env() -> dict[str, str]:
    """Environment for a local single-node Ray bound to loopback (also for ``ray start --head`` in tests)."""
    return {_SINGLE_NODE_ENV: "0"}


def _bind_to_loopback() -> None:
    os.environ.update(local_ray_env())
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import time; ray may have been imported already


def _warn_if_auth_disabled() -> None:
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        sys.stderr.write("[ray] warning: RAY_AUTH_MODE=disabled: this Ray cluster accepts requests without a "
                         "token (anyone who can reach its ports can run code as you); unset it to keep token "
                         "authentication on\n")


def init_ray(address: str | None = None, *, num_cpus: int | None = None, need_cpus: float = 0,
             object_store_memory_mb: int = 256, env_vars: dict[str, str] | None = None,
             log_to_driver: bool = True) -> None:
    """Connect to ``address`` / RAY_ADDRESS, or start a local Ray sized for this machine; no-op if connected."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if ray.is_initialized():
        return
    _warn_if_auth_disabled()
    runtime_env = {"env_vars": dict(env_vars)} if env_vars else None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside a submitted job the job's runtime env already applies; merge ours into it.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, runtime_env=runtime_env)
        return
    import math

    _bind_to_loopback()
    cpus = max(num_cpus or 0, math.ceil(need_cpus) + 1, 4)
    ray.init(num_cpus=cpus, object_store_memory=object_store_memory_mb << 20, include_dashboard=True,
             dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK, runtime_env=runtime_env,
             log_to_driver=log_to_driver)
