"""The command line's argument helpers: argparse types that refuse a bad value as a usage error (exit 2, before
any work), and the plan check the commands that start a run share. Apart from ``cli`` so that a stage's
``commands`` module, which ``cli`` loads, never imports ``cli`` back."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def non_negative_arg(text: str) -> int:
    v = int_arg(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def positive_arg(text: str) -> int:
    v = int_arg(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def max_length_arg(text: str) -> int:
    """``--max-length``: the same bounds as ``data.max_length``."""
    v = int_arg(text)
    if not 64 <= v <= 1 << 24:
        raise argparse.ArgumentTypeError(f"must be between 64 and {1 << 24} tokens, got {v}")
    return v


def scale_arg(text: str) -> str:
    """``--scale``: MIN-MAX, checked here so that a typo is a usage error, not a traceback."""
    from tract_dist.data.score_tokens import ScaleError, parse_scale

    try:
        parse_scale(text)
    except ScaleError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def safe_name_arg(text: str) -> str:
    """``--run-name`` / ``--name``: one folder name (letters, digits, . _ -), never a path."""
    import re

    from tract_dist.config import SAFE_NAME

    if not re.match(SAFE_NAME, text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a safe name: use 1-128 letters, digits, '.', '_' or "
                                         "'-', starting with a letter or digit (it names a folder)")
    return text


def add_plan_check_arg(p: argparse.ArgumentParser) -> None:
    """``--no-plan-check`` of the commands that plan a run before starting it (train, pipeline, submit)."""
    p.add_argument("--no-plan-check", action="store_true",
                   help="start without checking the plan (tract-dist plan): per-GPU memory against the device's")


def run_plan_check(args: argparse.Namespace, cfg: Any, command: str, *, local: bool = True) -> None:
    """The plan check before a run starts (tract_dist.plan.check), unless ``--no-plan-check``; ``local``: the
    run uses this machine (not a submitted job), so a CPU run is checked against its memory."""
    if getattr(args, "no_plan_check", False):
        return
    from tract_dist.plan.check import plan_check

    for line in plan_check(cfg, command, local=local):
        print(line, file=sys.stderr, flush=True)
