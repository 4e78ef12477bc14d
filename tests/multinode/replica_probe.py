"""A pool worker that reports the node its replica runs on (tests/multinode: generation and evaluation
replicas are spread one per node)."""

from __future__ import annotations

import time
from typing import Any


class NodeOfReplica:
    def __init__(self) -> None:
        import ray

        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        time.sleep(0.3)  # rows last long enough for both replicas to start, on a loaded machine too
        return {"i": list(batch["i"]), "node": [self.node] * len(batch["i"])}
