"""CoT-RAIL inference (``Judge``) with the decode and score-only (RAIL without CoT) baselines."""

from tract_dist.judge.judge import MODES, Judge, JudgeResult, as_example, judge_kwargs
from tract_dist.judge.parsing import parse_decoded_score
from tract_dist.judge.rail import RailReadout, score_distribution

__all__ = ["MODES", "Judge", "JudgeResult", "RailReadout", "as_example", "judge_kwargs", "parse_decoded_score",
           "score_distribution"]
