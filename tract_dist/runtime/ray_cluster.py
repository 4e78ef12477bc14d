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

import logging
import os
from typing import TYPE_CHECKING

from tract_dist.console import CONSOLE, CONSOLE_ERR

if TYPE_CHECKING:
    from tract_dist.config import ClusterSection

log = logging.getLogger(__name__)

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
        log.warning("[ray] warning: RAY_AUTH_MODE=disabled: this Ray cluster accepts requests without a token "
                    "(anyone who can reach its ports can run code as you); unset it to keep token authentication "
                    "on", extra=CONSOLE_ERR)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, need_cpus: float = 0,
             object_store_memory_mb: int = 256, env_vars: dict[str, str] | None = None,
             log_to_driver: bool = True) -> None:
    """Connect to ``address`` / RAY_ADDRESS, or start a local Ray sized for this machine; no-op if connected."""
    import ray

    from tract_dist import console
    from tract_dist.runtime import ray_logging

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ray_logging.quiet_ray_data()  # also when a cluster was started earlier (the test suite's)
    if ray.is_initialized():
        return
    _warn_if_auth_disabled()
    address = address or os.environ.get("RAY_ADDRESS")
    # Quiet (no --verbose): Ray's INFO lines off the terminal; a local cluster's workers log to the run folder.
    init_opts, env_extra = ray_logging.init_options(local=not address)
    runtime_env = {**({"env_vars": dict(env_vars)} if env_vars else {}), **env_extra} or None
    if address:
        # Inside a submitted job the job's runtime env already applies; merge ours into it.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        with ray_logging.worker_lines_unprefixed():
            ray.init(address=address, runtime_env=runtime_env, **init_opts)
        return
    import math

    _bind_to_loopback()
    cpus = max(num_cpus or 0, math.ceil(need_cpus) + 1, 4)
    with ray_logging.worker_lines_unprefixed():
        ctx = ray.init(num_cpus=cpus, object_store_memory=object_store_memory_mb << 20, include_dashboard=True,
                       dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK, runtime_env=runtime_env,
                       log_to_driver=log_to_driver, **init_opts)
    if init_opts:  # Ray's own start-up line was INFO: one line instead, naming where the output goes
        log.info(f"[ray] local Ray started (dashboard http://{getattr(ctx, 'dashboard_url', '') or '-'}); worker output: "
                 f"{os.environ.get(console.LOG_DIR_ENV, ray_logging.session_logs())}, Ray's own logs: "
                 f"{ray_logging.session_logs()}", extra=CONSOLE)


def init_ray_from_config(c: ClusterSection, address: str | None = None) -> None:
    """:func:`init_ray` for a pipeline or training run from its ``cluster`` section: ``address`` /
    ``cluster.address`` / RAY_ADDRESS, or a local Ray with twice this machine's cores as logical CPUs
    (``cluster.local_num_cpus`` overrides).

    The workers' environment: DeepSpeed's accelerator, Ray Train's fast health check (STACK-NOTES: 31-37 s ->
    14-16 s per fit on 2 cores), quiet tokenizers, and on CPU one OpenMP thread per reserved CPU."""
    env = {"DS_ACCELERATOR": "cuda" if c.use_gpu else "cpu", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
           "TOKENIZERS_PARALLELISM": "false"}
    if not c.use_gpu:
        env["OMP_NUM_THREADS"] = str(max(1, int(c.cpus_per_worker)))
    init_ray(address or c.address, num_cpus=c.local_num_cpus or 2 * (os.cpu_count() or 1),
             need_cpus=c.num_workers * c.cpus_per_worker, object_store_memory_mb=c.object_store_memory_mb,
             env_vars=env)


def check_placement(c: ClusterSection) -> None:
    """Refuse a training run (its ``cluster`` section) the connected cluster cannot place (Ray Train would wait
    for the resources instead of failing)."""
    import ray

    from tract_dist.config import ConfigError

    n = c.min_workers or c.num_workers  # an elastic run starts with what fits, at least min_workers
    key = "cluster.min_workers" if c.min_workers else "cluster.num_workers"
    have = ray.cluster_resources()
    need = {"CPU": n * c.cpus_per_worker, **{k: n * v for k, v in c.resources_per_worker.items()}}
    if c.use_gpu:
        need["GPU"] = need.get("GPU", n)
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
    if short:
        detail = ", ".join(f"{k}: need {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
        raise ConfigError(f"{key}={n} cannot be placed ({detail}); lower {key} or cluster.cpus_per_worker, or "
                          "add nodes")
