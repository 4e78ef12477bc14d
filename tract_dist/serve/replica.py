"""The judge deployment: one :class:`~tract_dist.judge.Judge` per replica, its calls batched by ``serve.batch``.

The ingress sends one call per input; ``serve.batch`` gathers the calls that arrive within
``batch_wait_timeout_s`` (up to ``max_batch_size``) into one ``Judge.score_batch`` per (mode, n_cots, seed), so
concurrent clients share forward passes. Batching does not change a score: RAIL reads each row's own last
position (left padding, masked), and every sampled CoT uses its own (seed, input id, CoT index) generator.

The model runs in a worker thread so the replica's event loop keeps collecting the next batch and answering
Serve's health checks meanwhile; ``max_concurrent_batches=1`` keeps the judge single-threaded. A failure while
judging is returned per input (``failure``), never raised through the batch, so one bad input cannot fail the
other requests of its batch or the replica.

Deadlines and cancellation: each call carries its request's deadline (Unix time, set by the ingress), which
becomes a :class:`~tract_dist.runtime.deadline.StopSignal`. When Serve cancels a call (the ingress gave up at
its deadline, or the HTTP client went away), Serve raises ``asyncio.CancelledError`` in :meth:`score`: a call
still queued is dropped by ``serve.batch`` itself, and one already in the running batch has its signal
cancelled, so the engine ends its rows at the next decode step (HF) or aborts its requests (vLLM), and the
batch's slot goes to the next call. A call past its deadline stops the same way without any message.

Serving has its own generation budget (``serve.max_new_tokens``, else ``generation.max_new_tokens``); at
start-up the replica measures how long one decode step takes, so the ingress can refuse a request whose
generation cannot finish before its deadline instead of running it into a 504.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, deque
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ray import serve

from tract_dist.console import CONSOLE_ERR, attach
from tract_dist.runtime.deadline import StopSignal
from tract_dist.serve.templates import judge_template

if TYPE_CHECKING:
    from tract_dist.config import Config

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 16
"""Calls per ``score_batch``: on a CPU a RAIL forward pass of 16 prompts still fits a few hundred MiB of
activations for a 135M model; on a GPU the HF engine chunks by ``evaluation.batch_size`` and vLLM schedules
continuously, so a larger batch only adds waiting. The benchmark (benchmarks/serve/) measures the effect."""
DEFAULT_BATCH_WAIT_S = 0.01  # Serve's default: a lone request waits at most 10 ms for company
PROBE_TOKENS = 6  # new tokens per start-up decode probe: enough steps to amortise the prefill of ~10 tokens
PROBE_RUNS = 2
"""Timed probe runs, the fastest kept: on a shared CPU one run can land on a busy moment (a descheduled OpenMP
thread stalls every step), which would make the work bound refuse requests that fit."""
VLLM_ROWS_PER_PASS = 256  # vLLM's default max_num_seqs: rows it decodes together when the config sets none


class JudgeModel:
    """The replica's state: the judge, its scale and chat template, the serving budget and decode speed, and
    what is running now (for ``activity``)."""

    def __init__(self, cfg: Config, model_path: str, *, torch_threads: int | None = None,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S):
        import torch

        attach()  # a replica is its process's entry point: the project's console lines on its stderr, as before
        if torch_threads:
            torch.set_num_threads(torch_threads)
        from tract_dist.judge import Judge

        self.judge = Judge.from_config(cfg, model_path)
        budget = cfg.serve.max_new_tokens or cfg.generation.max_new_tokens
        self.budget_source = "serve.max_new_tokens" if cfg.serve.max_new_tokens else "generation.max_new_tokens"
        self.judge.sampling = replace(self.judge.sampling, max_new_tokens=budget)
        from tract_dist.judge.relative import PairJudge

        self.pair_judge = PairJudge(self.judge)  # relative grading on the same engine (data/relative.py)
        self.scale = tuple(self.judge.scale)
        self.template = judge_template(self.judge.tokenizer)
        self.defaults = {"mode": cfg.evaluation.mode, "n_cots": cfg.evaluation.num_cots, "seed": cfg.generation.seed}
        self.backend = getattr(self.judge.engine, "backend", "hf")
        self.rows_per_pass = (getattr(self.judge.engine, "batch_size", None) or 1) if self.backend == "hf" \
            else (cfg.generation.vllm.max_num_seqs or VLLM_ROWS_PER_PASS)
        self.decode_step_s = self._probe_decode_step()
        self._score_batched.set_max_batch_size(max_batch_size)
        self._score_batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []  # sizes of the last batches (tests and the benchmark read them)
        self.in_flight = 0  # calls received and not yet answered or cancelled
        self.running_rows = 0  # inputs in the batch the worker thread is running now
        self.counts: Counter[str] = Counter()  # calls, cancelled, and failures by kind (deadline, ...)
        self.recent_stops: deque[str] = deque(maxlen=64)  # the last stopped inputs' failure messages
        log.info(f"[serve] judge replica pid {os.getpid()} ready: {model_path} on {self.backend}, batches of up to "
                 f"{max_batch_size} within {batch_wait_timeout_s * 1000:g} ms; generation budget {budget} new tokens "
                 f"per CoT ({self.budget_source}), one decode step {self.decode_step_s * 1000:.1f} ms measured", extra=CONSOLE_ERR)

    def _probe_decode_step(self) -> float:
        """Seconds per decode step of one sequence, measured now (a warm-up run, which also builds the
        stop-string criterion, then the fastest of ``PROBE_RUNS``): the unit of the ingress's bound on a
        request's generation time."""
        from tract_dist.runtime.sampling import SamplingParams

        tok = self.judge.tokenizer
        ids = list(tok("Rate the response on a scale of 1 to 5.", add_special_tokens=True)["input_ids"])
        # the judge's stop strings: the HF engine builds their criterion (seconds) here, not in a first request
        params = SamplingParams(temperature=0.0, max_new_tokens=PROBE_TOKENS, stop=self.judge.sampling.stop)
        self.judge.engine.generate([ids], [0], params)  # warm-up
        best = float("inf")
        for _ in range(PROBE_RUNS):
            t = time.perf_counter()
            g = self.judge.engine.generate([ids], [0], params)[0]
            best = min(best, (time.perf_counter() - t) / max(g.new_tokens, 1))
        return best

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "scale": list(self.scale), "defaults": self.defaults,
                "score_values": list(self.judge.score_scale.scores), "pid": os.getpid(),
                "max_new_tokens": self.judge.sampling.max_new_tokens, "budget_source": self.budget_source,
                "decode_step_s": self.decode_step_s, "rows_per_pass": self.rows_per_pass,
                "template": self.template.as_dict()}

    def recent_batch_sizes(self) -> list[int]:
        return list(self.batch_sizes)

    def activity(self) -> dict[str, Any]:
        """What this replica holds now and has stopped: ``in_flight`` calls (queued or running), the inputs of
        the running batch, counts (calls, cancelled, deadline, ...) and the last stops' messages."""
        return {"in_flight": self.in_flight, "running_rows": self.running_rows, "counts": dict(self.counts),
                "recent_stops": list(self.recent_stops)}

    async def score(self, call: dict[str, Any]) -> dict[str, Any]:
        """One input ({fields, mode, n_cots, seed, deadline}) -> its JudgeResult as a dict. Cancellation by
        Serve (``asyncio.CancelledError`` here) cancels the input's stop signal, then propagates."""
        stop = StopSignal.until_unix(call.get("deadline"))
        self.in_flight += 1
        self.counts["calls"] += 1
        try:
            return await self._score_batched({**call, "stop": stop})
        except asyncio.CancelledError:
            stop.cancel()
            self.counts["cancelled"] += 1
            raise
        finally:
            self.in_flight -= 1

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _score_batched(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Batched by Serve; the model runs in a worker thread (see the module docstring)."""
        return await asyncio.to_thread(self._score_now, calls)

    def _score_now(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.batch_sizes = (self.batch_sizes + [len(calls)])[-1000:]
        self.running_rows = len(calls)
        try:
            return self._score_groups(calls)
        finally:
            self.running_rows = 0

    def _score_groups(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any] | None] = [None] * len(calls)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, c in enumerate(calls):
            key = tuple(c.get(k) if c.get(k) is not None else self.defaults[k] for k in ("mode", "n_cots", "seed"))
            groups.setdefault(key + (c.get("task", "absolute"), bool(c.get("swap"))), []).append(i)
        for (mode, n_cots, seed, task, swap), idxs in groups.items():
            self.judge.seed = seed  # the base of every CoT's sampling seed (Judge reads it per call)
            try:
                stops = [calls[i].get("stop") for i in idxs]
                if task == "relative":  # one comparison when the default count is adaptive (absolute's ŷ error)
                    results = self.pair_judge.grade_batch([calls[i]["fields"] for i in idxs], mode=mode, swap=swap,
                                                          n_cots=1 if n_cots == "auto" else n_cots, stops=stops)
                else:
                    results = self.judge.score_batch([calls[i]["fields"] for i in idxs], n_cots=n_cots, mode=mode,
                                                     stops=stops)
                for i, r in zip(idxs, results):
                    out[i] = r.to_dict()
            except Exception as e:  # noqa: BLE001 - answered per input; the replica and the batch go on
                for i in idxs:
                    out[i] = {"score": None, "p_a": None, "mode": mode,
                              "failure": f"error: {type(e).__name__}: {e}"[:500]}
        for o in out:
            why = (o or {}).get("failure") or ""
            kind = why.split(":", 1)[0]
            if kind in ("deadline", "cancelled"):
                self.counts[f"stopped_{kind}"] += 1
                self.recent_stops.append(why)
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
