"""CoT-RAIL inference (``Judge``) with the decode and score-only (RAIL without CoT) baselines.

Names are imported lazily so that ``tract-dist`` (which imports ``judge.commands``) starts without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MODES": "tract_dist.judge.judge", "Judge": "tract_dist.judge.judge", "JudgeResult": "tract_dist.judge.judge",
    "as_example": "tract_dist.judge.judge", "judge_kwargs": "tract_dist.judge.judge",
    "parse_decoded_score": "tract_dist.judge.parsing",
    "RailReadout": "tract_dist.judge.rail", "score_distribution": "tract_dist.judge.rail",
    "readouts": "tract_dist.judge.rail",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tract_dist.judge' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
