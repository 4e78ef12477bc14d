"""The generation tests run tiny-model generation in this process (tiny_export, ray_local: tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here generates in-process: one intra-op thread (tests/conftest.py says why)."""
