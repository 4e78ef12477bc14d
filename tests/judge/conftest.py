"""The judge tests score with a tiny model in this process (tiny_export: tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs the judge in-process: one intra-op thread (tests/conftest.py says why)."""
