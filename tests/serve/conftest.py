"""Fixtures of the judge-server tests: one Ray Serve instance on a free loopback port for the module that asks.

Three applications share it: ``smol`` serves the real SmolLM2-135M (float32, one replica, the default mode with
a serving budget of 8 new tokens, batches gathered over 50 ms so a multi-input request is one batch) for the
endpoint, exactness and client-library tests; ``load`` serves the tiny random Llama export (two replicas) for
the load and replica-kill test, because 200 SmolLM2 forward passes cost 200-400 core-seconds on a 2-core
machine (measured: 1.5-2.3 s per 260-token prompt), far over the serve tests' 90 s budget, and the serving
path under load is the same code whatever the model; ``slow`` serves the tiny export with a 6 s deadline for
the deadline and disconnect tests (serve_helpers.SLOW_BUDGET says why it runs past it).
"""

from __future__ import annotations

import pytest

from serve_helpers import (API_KEY, LOAD_ID, SLOW_BUDGET, SLOW_ID, SLOW_TIMEOUT_S, SMOL_ID, free_port,
                           judge_config)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One intra-op thread in this process (tests/conftest.py says why; the replicas set their own)."""


@pytest.fixture(scope="module")
def server(ray_local, smollm2_dir, tiny_export):
    """Base URL of a running Serve with both applications; Serve is shut down after the module (its replicas
    hold logical CPUs that later tests' Ray Train runs need). The deadline is generous: on a shared 2-core
    machine at load average 30, one CoT-RAIL request took over 60 s (and was answered 504, as it should)."""
    from ray import serve

    from tract_dist.serve.app import ServeOptions, build_app, start_http

    port = free_port()
    start_http("127.0.0.1", port, request_timeout_s=300)
    smol = build_app(judge_config(smollm2_dir), smollm2_dir,
                     ServeOptions(model_id=SMOL_ID, replicas=1, cpus_per_replica=1, torch_threads=2,
                                  max_batch_size=16, batch_wait_timeout_s=0.05, request_timeout_s=300,
                                  api_key=API_KEY, max_body_bytes=1 << 20))
    load = build_app(judge_config(tiny_export), tiny_export,
                     ServeOptions(model_id=LOAD_ID, replicas=2, cpus_per_replica=0.5, torch_threads=1,
                                  max_batch_size=16, batch_wait_timeout_s=0.01, request_timeout_s=300))
    slow = build_app(judge_config(tiny_export, f"serve.max_new_tokens={SLOW_BUDGET}", "evaluation.batch_size=64"),
                     tiny_export, ServeOptions(model_id=SLOW_ID, replicas=1, cpus_per_replica=0.25, torch_threads=1,
                                               max_batch_size=64, request_timeout_s=SLOW_TIMEOUT_S))
    try:
        serve.run_many([serve.RunTarget(smol, name="smol", route_prefix="/"),
                        serve.RunTarget(load, name="load", route_prefix="/load"),
                        serve.RunTarget(slow, name="slow", route_prefix="/slow")])
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}
