"""CoT-RAIL inference (``Judge``; relative grading: ``PairJudge``) with the decode and score-only (RAIL without CoT) baselines.

Names are imported lazily so that ``tract-dist`` (which imports ``judge.commands``) starts without torch.
"""

from __future__ import annotations

from tract_dist.lazy import lazy_exports

_EXPORTS = {
    "MODES": "judge", "Judge": "judge", "JudgeResult": "judge", "as_example": "judge", "judge_kwargs": "judge",
    "parse_decoded_score": "parsing",
    "RailReadout": "rail", "score_distribution": "rail", "readouts": "rail",
    "PairJudge": "relative", "PairResult": "relative", "as_pair": "relative", "debiased": "relative",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
