"""The Triton kernels, run by Triton's CPU interpreter in a fresh process, agree with PyTorch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("triton_interpret_check.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    env.pop("TRACT_LOSS_TRITON", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=220, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TRITON_INTERPRET checks passed" in proc.stdout
