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
