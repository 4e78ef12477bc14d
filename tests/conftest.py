"""Shared fixtures: the real benchmark data beside the checkout, and offline tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("TRACT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def vicuna_path() -> Path:
    """The real Vicuna Bench judge set; skipped when absent, except under CI=true where it must exist."""
    p = shared_data_dir() / "prometheus-eval" / "vicuna_eval.json"
    if not p.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{p} is missing (set TRACT_SHARED_DATA to the shared data folder)")
        pytest.skip(f"{p} is absent (set TRACT_SHARED_DATA to the shared data folder)")
    return p


@pytest.fixture(scope="session")
def tokenizers():
    from tract_dist.data.assets import load_tokenizer

    return {name: load_tokenizer(name) for name in ("mistral", "llama3", "smollm2")}


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole suite, sized for a 2-core machine (logical CPUs; see STACK-NOTES)."""
    import ray

    from tract_dist.ray_runtime import init_ray

    init_ray(None, num_cpus=4, log_to_driver=False,
             env_vars={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                       "TOKENIZERS_PARALLELISM": "false"})
    yield ray
    ray.shutdown()
