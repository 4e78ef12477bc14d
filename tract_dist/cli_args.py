"""The command line's argparse types (a bad value is a usage error: exit 2, before any work) and the options
several commands share. Apart from ``cli`` so that a stage's ``commands`` module, which ``cli`` loads, never
imports ``cli`` back."""

from __future__ import annotations

import argparse


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


def add_ray_address_arg(p: argparse.ArgumentParser) -> None:
    """``--address``: the Ray cluster a run connects to (train, train-real, pipeline)."""
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")


def add_fresh_arg(p: argparse.ArgumentParser, what: str) -> None:
    """``--fresh``: what a run does with a folder made with other settings (``what``); without it, refused."""
    p.add_argument("--fresh", action="store_true", help=f"{what} (default: refuse, naming both fingerprints)")

