"""The judge deployment: one :class:`~tract_dist.judge.Judge` per replica, its calls batched by ``serve.batch``.

The ingress sends one call per input; ``serve.batch`` gathers the calls that arrive within
``batch_wait_timeout_s`` (up to ``max_batch_size``) into one ``Judge.score_batch`` per (mode, n_cots, seed), so
concurrent clients share forward passes. Batching does not change a score: RAIL reads each row's own last
position (left padding, masked), and every sampled CoT uses its own (seed, input id, CoT index) generator.

The model runs in a worker thread so the replica's event loop keeps collecting the next batch and answering
Serve's health checks meanwhile; ``max_concurrent_batches=1`` keeps the judge single-threaded. A failure while
judging is returned per input (``failure``), never raised through the batch, so one bad input cannot fail the
other requests of its batch or the replica.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from ray import serve

from tract_dist.serve.prompting import ChatMarkers, RequestError, split_query

DEFAULT_MAX_BATCH_SIZE = 16
"""Calls per ``score_batch``: on a CPU a RAIL forward pass of 16 prompts still fits a few hundred MiB of
activations for a 135M model; on a GPU the HF engine chunks by ``evaluation.batch_size`` and vLLM schedules
continuously, so a larger batch only adds waiting. The benchmark (benchmarks/serve/) measures the effect."""
DEFAULT_BATCH_WAIT_S = 0.01  # Serve's default: a lone request waits at most 10 ms for company


class JudgeModel:
    """The replica's state: the judge, its scale and chat markers, and the config's default options."""

    def __init__(self, cfg: Any, model_path: str, *, torch_threads: int | None = None,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        from tract_dist.judge import Judge

        self.judge = Judge.from_config(cfg, model_path)
        self.scale = tuple(self.judge.scale)
        self.markers = ChatMarkers.from_tokenizer(self.judge.tokenizer)
        self.defaults = {"mode": cfg.evaluation.mode, "n_cots": cfg.evaluation.num_cots, "seed": cfg.generation.seed}
        self.backend = getattr(self.judge.engine, "backend", "hf")
        self.score.set_max_batch_size(max_batch_size)
        self.score.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []  # sizes of the last batches (tests and the benchmark read them)
        print(f"[serve] judge replica pid {os.getpid()} ready: {model_path} on {self.backend}, batches of up to "
              f"{max_batch_size} within {batch_wait_timeout_s * 1000:g} ms", file=sys.stderr, flush=True)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "scale": list(self.scale), "defaults": self.defaults,
                "score_values": list(self.judge.score_tokens.scores), "pid": os.getpid()}

    def recent_batch_sizes(self) -> list[int]:
        return list(self.batch_sizes)

    def split_queries(self, queries: list[str], prompts: list[str] | None) -> list[dict[str, Any]]:
        """OpenRLHF queries -> {instruction, response} or {error, field} each (needs the tokenizer's template)."""
        out = []
        for i, q in enumerate(queries):
            try:
                ins, resp = split_query(q, prompts[i] if prompts else None, self.markers, i)
                out.append({"instruction": ins, "response": resp})
            except RequestError as e:
                out.append({"error": str(e), "field": e.field})
        return out

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def score(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Batched: each call is {fields, mode, n_cots, seed}; each answer the input's JudgeResult as a dict."""
        return await asyncio.to_thread(self._score_now, calls)

    def _score_now(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.batch_sizes = (self.batch_sizes + [len(calls)])[-1000:]
        out: list[dict[str, Any] | None] = [None] * len(calls)
        groups: dict[tuple[str, int, int], list[int]] = {}
        for i, c in enumerate(calls):
            key = tuple(c.get(k) if c.get(k) is not None else self.defaults[k] for k in ("mode", "n_cots", "seed"))
            groups.setdefault(key, []).append(i)  # type: ignore[arg-type]
        for (mode, n_cots, seed), idxs in groups.items():
            self.judge.seed = seed  # the base of every CoT's sampling seed (Judge reads it per call)
            try:
                results = self.judge.score_batch([calls[i]["fields"] for i in idxs], n_cots=n_cots, mode=mode)
                for i, r in zip(idxs, results):
                    out[i] = r.to_dict()
            except Exception as e:  # noqa: BLE001 - answered per input; the replica and the batch go on
                for i in idxs:
                    out[i] = {"score": None, "mode": mode, "failure": f"error: {type(e).__name__}: {e}"[:500]}
        return [o or {"score": None, "failure": "error: no result"} for o in out]


def judge_deployment(*, num_replicas: int, num_cpus: float, num_gpus: float, max_ongoing_requests: int,
                     autoscale: tuple[int, int] | None = None, target_ongoing_requests: int = 16) -> Any:
    """The judge as a Serve deployment with these resources (one replica per GPU on a GPU cluster): a fixed
    ``num_replicas``, or with ``autoscale=(min, max)`` Serve's autoscaler, which adds a replica when the
    replicas hold more than ``target_ongoing_requests`` each (a full batch waiting) and removes idle ones."""
    scaling: dict[str, Any] = {"num_replicas": num_replicas}
    if autoscale is not None:
        lo, hi = autoscale
        scaling = {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                          "target_ongoing_requests": target_ongoing_requests}}
    return serve.deployment(
        JudgeModel, name="JudgeModel", **scaling,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max_ongoing_requests,
        # A replica loads a model: give its constructor time, and let a slow CPU forward pass not be taken for
        # a dead replica (Serve's defaults: 30 s health-check timeout every 10 s).
        health_check_period_s=10, health_check_timeout_s=60, graceful_shutdown_timeout_s=20,
    )
