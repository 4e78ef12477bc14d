"""Run a batch function over rows: a Ray Data actor pool (one model replica per GPU, per tensor-parallel group
of GPUs, or per CPU slot) or in-process.

Generation and evaluation both have the same shape (load a model once, map batches of rows to result rows),
so both use this module, whichever inference backend the replicas run. Why not ``ray.data.llm``: CoT-RAIL
generates the CoTs and reads the score from the *same* engine (so the read-out reuses the CoT's KV cache), a
batch that fails is retried row by row into failure records, and the HF backend has to run the same way; a
``ray.data.llm`` processor is one vLLM request per row and its own engine per stage. The worker is a class ``Worker(**kwargs)`` whose ``__call__(batch)`` maps a dict of
columns to a dict of columns; Ray Data instantiates it once per actor (``ActorPoolStrategy``), the in-process
path once. Results stream back as they finish (no ordering), so the caller can commit output incrementally. On a
cluster of several nodes the replicas are spread over the nodes (Ray's ``SPREAD`` strategy: one per node
while every node has room, best effort beyond), so each node loads its own copy of the model.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

if TYPE_CHECKING:
    from tract_dist.config import ClusterSection


@dataclass(frozen=True)
class PoolSpec:
    """Where and how wide to run: ``use_ray=False`` runs in this process (a GPU box without Ray)."""

    use_ray: bool = True
    replicas: int = 1
    batch_size: int = 8
    use_gpu: bool = False
    cpus_per_replica: float = 1.0
    address: str | None = None
    local_num_cpus: int | None = None
    object_store_memory_mb: int = 256
    threads_per_replica: int | None = None  # torch CPU threads per replica; None: the cores shared out
    gpus_per_replica: int = 1  # with use_gpu: a tensor-parallel replica holds tensor_parallel_size GPUs

    @classmethod
    def from_cluster(cls, c: ClusterSection, *, use_ray: bool, batch_size: int, replicas: int | None = None,
                     gpus_per_replica: int = 1) -> "PoolSpec":
        """The pool of a stage from the ``cluster`` section (``replicas`` unset: ``cluster.num_workers``)."""
        return cls(use_ray=use_ray, replicas=replicas or c.num_workers, batch_size=batch_size, use_gpu=c.use_gpu,
                   cpus_per_replica=c.cpus_per_worker, address=c.address, local_num_cpus=c.local_num_cpus,
                   object_store_memory_mb=c.object_store_memory_mb, gpus_per_replica=gpus_per_replica,
                   threads_per_replica=c.threads_per_replica)

    def torch_threads(self) -> int:
        """CPU threads per replica: the machine's cores shared out, so replicas do not oversubscribe them."""
        if self.threads_per_replica:
            return self.threads_per_replica
        return max(1, (os.cpu_count() or 1) // (1 if self.use_gpu or not self.use_ray else self.replicas))


def ensure_ray(spec: PoolSpec) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), or start a local Ray with logical CPUs to spare.

    A local Ray whose actors hold every CPU starves Ray Data's read tasks and deadlocks silently (STACK-NOTES),
    so the local cluster gets at least one CPU more than the pool needs, and never fewer than 4 logical CPUs.
    """
    from tract_dist.runtime.ray_cluster import init_ray

    init_ray(spec.address, num_cpus=spec.local_num_cpus, need_cpus=spec.replicas * spec.cpus_per_replica,
             object_store_memory_mb=spec.object_store_memory_mb)


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def _plain(x: Any) -> Any:
    """A value of a numpy column as plain Python: Arrow list columns arrive as arrays inside object arrays."""
    return x.tolist() if isinstance(x, np.ndarray) else x


def rows_of(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A column batch (lists or numpy arrays) as a list of plain-Python row dicts."""
    cols = {k: ([_plain(x) for x in v.tolist()] if isinstance(v, np.ndarray) else list(v)) for k, v in batch.items()}
    n = len(next(iter(cols.values()))) if cols else 0
    return [{k: cols[k][i] for k in cols} for i in range(n)]


def error_reason(e: BaseException) -> str:
    """How a row that raised is recorded: ``error: Type: message``, cut to 500 characters."""
    return f"error: {type(e).__name__}: {e}"[:500]


class RowBatchWorker:
    """Base of the pool's workers (generation's ``CotWorker``, evaluation's ``JudgeWorker``): a column batch in,
    one result row per input row out.

    A batch that raises is retried row by row, so one bad row (an input the engine rejects) cannot take its
    neighbours down; a row that still raises becomes :meth:`failed` with :func:`error_reason`, so every input
    row yields a result (``map_rows``'s contract) and the failure is recorded, never dropped. Subclasses build
    their engine in ``__init__`` and implement :meth:`run_rows` and :meth:`failed`.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "RowBatchWorker":
        from tract_dist import console

        console.attach()  # a pool actor is its process's entry point: the project's console lines on its terminal
        return super().__new__(cls)

    def run_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Result rows for ``rows`` (one each; errors a row can be blamed for alone are results, not raises)."""
        raise NotImplementedError

    def failed(self, row: dict[str, Any], reason: str) -> dict[str, Any]:
        """The result row of an input whose processing raised on its own."""
        raise NotImplementedError

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        rows = rows_of(batch)
        try:
            out = self.run_rows(rows)
        except Exception:  # isolate the failing row(s): retry one by one
            out = []
            for row in rows:
                try:
                    out += self.run_rows([row])
                except Exception as e:  # noqa: BLE001 - recorded with its reason, never dropped
                    out.append(self.failed(row, error_reason(e)))
        return _columns(out)


SPREAD = "SPREAD"  # Ray's spread scheduling strategy for the replica actors (see map_rows)


def map_rows(rows: list[dict[str, Any]], worker_cls: type, worker_kwargs: dict[str, Any],
             spec: PoolSpec) -> Iterator[list[dict[str, Any]]]:
    """Yield lists of result rows as batches finish. Every input row yields exactly one result row."""
    if not rows:
        return
    if not spec.use_ray:
        worker = worker_cls(**worker_kwargs)
        for i in range(0, len(rows), spec.batch_size):
            yield rows_of(worker(_columns(rows[i:i + spec.batch_size])))
        return

    import ray

    ensure_ray(spec)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the caller shows one bar with throughput
    # Small blocks so each finished batch streams back at once instead of waiting for its block's neighbours.
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / spec.batch_size)))
    resources: dict[str, Any] = {"num_cpus": spec.cpus_per_replica}
    if spec.use_gpu:
        resources["num_gpus"] = spec.gpus_per_replica  # Ray sets CUDA_VISIBLE_DEVICES to the replica's GPUs
    # SPREAD: the replicas go to different nodes while nodes with room remain (one per node on a cluster of
    # ``replicas`` nodes, each fetching the export into its own cache), not packed onto the first node that
    # fits them. Ray Data's own default today, spelled out: its DataContext default is deprecated.
    ds = ds.map_batches(worker_cls, fn_constructor_kwargs=worker_kwargs, batch_size=spec.batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=spec.replicas),
                        scheduling_strategy=SPREAD, **resources)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield rows_of(batch)
