"""Fixtures of the evaluation tests (tiny_export, ray_local, vicuna_path: tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here judges in-process: one intra-op thread (tests/conftest.py says why)."""


@pytest.fixture(scope="session")
def vicuna_examples(vicuna_path):
    """The full Vicuna Bench judge set's 320 examples (skipped where the set is absent, as vicuna_path is)."""
    from tract_dist.data.formats import read_examples

    return read_examples(str(vicuna_path), "prometheus-eval", require_feedback=False).examples
