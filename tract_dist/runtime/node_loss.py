"""Name the node a fixed-size training run lost, instead of Ray Train's bare worker error or an endless wait.

Without ``cluster.min_workers`` a run needs all ``cluster.num_workers`` workers. When a node it runs on dies,
Ray Train either fails at once (``max_failures`` 0: a ``WorkerGroupError`` wrapping an ``ActorDiedError``) or
restarts the group and waits for a placement the remaining nodes cannot meet, retrying the worker group's
start forever (``FailureConfig.controller_failure_limit`` defaults to unlimited). On a cluster of several nodes
the driver bounds that wait (:func:`failure_config`) and, when training fails, compares the nodes alive at
the start with those alive now (``ray.nodes()``): a lost one turns the failure into :class:`NodeLostError`
(exit 1) naming the node, where the checkpoints are, and the two ways on.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from tract_dist.errors import RunFailure

START_ATTEMPTS_AFTER_LOSS = 5
"""Worker-group starts a fixed-size run on several nodes makes before it fails: each waits Ray Train's start
timeout (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, 60 s by default), so a node has about five minutes to come
back (a restarted VM, an autoscaler's replacement) before the run stops with the lost node's name."""
_DEATH_NOTICE_S = 45.0
"""How long a failed fixed-size run on several nodes waits for the GCS to mark a lost node dead before it
reports Ray Train's own error: the health check declares a node dead after about 15-30 s without heartbeats,
while the surviving ranks fail at once (gloo: "Connection closed by peer"), so the first error Ray Train
reports is often theirs, an exception of the training code, not the dead node's."""


class NodeLostError(RunFailure, RuntimeError):
    """A fixed-size training run lost a node it was placed on and cannot go on without it."""


def alive_nodes(nodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """NodeID -> entry of the alive nodes of a ``ray.nodes()`` listing."""
    return {n["NodeID"]: n for n in nodes if n.get("Alive")}


def lost_nodes(before: dict[str, dict[str, Any]], now: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The nodes alive in ``before`` that the listing ``now`` reports dead or no longer lists."""
    alive = alive_nodes(now)
    return [n for nid, n in before.items() if nid not in alive]


def describe(node: dict[str, Any]) -> str:
    return f"{node.get('NodeManagerAddress', '?')} (node {node['NodeID'][:12]})"


def failure_config(max_failures: int, elastic: bool, nodes: int) -> dict[str, int]:
    """``FailureConfig`` arguments: a fixed-size run on several nodes gets a bounded number of worker-group
    starts (:data:`START_ATTEMPTS_AFTER_LOSS`); one node, or an elastic run, keeps Ray Train's default."""
    if elastic or nodes < 2:
        return {"max_failures": max_failures}
    return {"max_failures": max_failures, "controller_failure_limit": START_ATTEMPTS_AFTER_LOSS}


def node_lost_error(before: dict[str, dict[str, Any]], error: BaseException, *, num_workers: int, storage: str,
                    list_nodes: Callable[[], list[dict[str, Any]]],
                    wait_s: float = _DEATH_NOTICE_S) -> NodeLostError | None:
    """The :class:`NodeLostError` for ``error`` when a node of ``before`` is gone (polled up to ``wait_s``, the
    GCS declares a node dead some seconds after its raylet stops), else None. Any failure is checked, not only
    a dead worker actor: the ranks left on live nodes usually fail first, with a collective's error."""
    if len(before) < 2:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        lost = lost_nodes(before, list_nodes())
        if lost or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if not lost:
        return None
    names = ", ".join(describe(n) for n in lost)
    return NodeLostError(
        f"training lost {len(lost)} of its {len(before)} nodes: {names} is no longer alive, and the run needs all "
        f"cluster.num_workers={num_workers} workers (no cluster.min_workers), which the remaining nodes cannot "
        f"place. The last checkpoint is in {storage}: rerun the same command when the cluster has room again to "
        f"resume from it, or set cluster.min_workers (with training.global_batch_size) to continue on fewer "
        f"workers. Ray Train's error: {_headline(error)}")


def _headline(error: BaseException) -> str:
    """The first line of the underlying failure (a worker's, or the controller's), not Ray Train's wrapper."""
    failures = getattr(error, "worker_failures", None) or {}
    inner = next(iter(failures.values()), None) or getattr(error, "controller_failure", None) or error
    lines = [x.strip() for x in str(inner).splitlines() if x.strip()]
    return (lines[0] if lines else type(inner).__name__)[:300]
