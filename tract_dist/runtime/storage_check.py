"""Refuse, before any stage starts, a multi-node run whose hand-over folders are not shared by every node.

Ray Train documents that a multi-node run needs its ``storage_path`` on shared storage; a local folder then
breaks after the first stage on another node (or, worse, reads a stale copy left there). Whether a path is
shared cannot be read from its name (an NFS mount looks like any folder), so it is tested: the driver writes a
marker file with a random token into the folder, and a zero-CPU task pinned to each alive node
(``NodeAffinitySchedulingStrategy(soft=False)``) reads it back. A node that does not see the token does not
share the folder. One machine (one alive node) and URIs are not checked: there is nothing to share.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

from tract_dist.storage import is_uri

_MARKER_TIMEOUT_S = 120.0  # a task per node; a loaded node may take a while to start a worker process


def _reads_token(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return None


def _answer(ray: Any, ref: Any) -> str | None:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError:
        return None


def unshared_nodes(folder: str, nodes: list[dict]) -> list[dict]:
    """The alive ``nodes`` (``ray.nodes()`` entries) that do not see a marker written into local ``folder``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    d = Path(folder).resolve()
    d.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = d / f".tract-shared-check-{token}"
    marker.write_text(token, encoding="utf-8")
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_reads_token)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker)) for n in nodes]
        # A node that dies (or cannot start a worker) before its probe answers cannot be shown to share the
        # folder: it counts as blind rather than stopping the check with Ray's own error.
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=_MARKER_TIMEOUT_S)
        seen = [_answer(ray, ref) if ref in ready else None for ref in refs]
    finally:
        with contextlib.suppress(OSError):
            marker.unlink()
    return [n for n, got in zip(nodes, seen) if got != token]


def check_shared_storage(folders: dict[str, str]) -> None:
    """With more than one alive node in the connected cluster, every local folder of ``folders`` (config key:
    path) must be the same folder on every node; raises ConfigError naming the key, the folder and the nodes
    that cannot see it, and ``cluster.storage_path``, the key that moves the hand-over onto shared storage."""
    import ray

    from tract_dist.config import ConfigError

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    for key, folder in folders.items():
        if is_uri(folder):
            continue
        blind = unshared_nodes(folder, nodes)
        if blind:
            names = ", ".join(f"{n.get('NodeManagerAddress', '?')} (node {n['NodeID'][:12]})" for n in blind)
            raise ConfigError(
                f"{key}={folder} is a folder on this machine that {len(blind)} of the cluster's {len(nodes)} nodes "
                f"cannot see ({names}): stages on those nodes would not find what another stage wrote there. Set "
                f"cluster.storage_path to shared storage (s3://bucket/prefix, gs://..., or a folder every node "
                f"mounts)" + ("" if key == "cluster.storage_path" else f", and {key} to a folder every node mounts"))
