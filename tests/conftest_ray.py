"""Fixtures shared by the generate/judge/evaluate tests (imported by their folder conftests).

One Ray cluster per session, started lazily by the first test that needs it, with logical CPUs so the actor
pool never starves Ray Data's tasks (STACK-NOTES); a tiny random-Llama export with the SmolLM2 tokenizer.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster(ray_local):
    """The suite's one Ray (tests/conftest.py)."""
    return ray_local


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A stage-1-export-shaped HF folder: tiny deterministic Llama + SmolLM2's tokenizer and chat template."""
    from tract_dist.generate.tiny_export import save_tiny_export

    return str(save_tiny_export(tmp_path_factory.mktemp("tiny_export") / "model", "smollm2"))


@pytest.fixture(scope="session")
def vicuna_examples(vicuna_path):
    from tract_dist.data.formats import read_examples

    return read_examples(str(vicuna_path), "prometheus-eval", require_feedback=False).examples


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread per test process: on a shared 2-core machine, two OpenMP threads spin-waiting on a
    busy core made tiny-model generation 5-10x slower at random (see the generation benchmark); the Ray
    replicas get their own thread counts."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
