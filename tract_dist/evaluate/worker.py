"""The judging replica for evaluation: the same pool machinery as generation, with a ``Judge`` inside (on the
engine of ``evaluation.backend``: CoTs and their RAIL read-out come from one engine, so vLLM's prefix cache
serves the read-out)."""

from __future__ import annotations

import json
from typing import Any

from tract_dist.data.schema import JudgeExample
from tract_dist.runtime.engine import EngineSpec
from tract_dist.runtime.pool import RowBatchWorker
from tract_dist.runtime.sampling import SamplingParams


class JudgeWorker(RowBatchWorker):
    """Callable class for ``map_batches``: columns id, example (JSON) -> one prediction row per input (an input
    whose judging raised on its own is a failed prediction with its reason)."""

    def __init__(self, engine: dict[str, Any], judge_kwargs: dict[str, Any], n_cots: int, mode: str):
        from tract_dist.judge.judge import Judge
        from tract_dist.runtime.backend import build_engine

        kw = dict(judge_kwargs)
        s = kw["sampling"]
        kw["sampling"] = SamplingParams(**{**s, "stop": tuple(s.get("stop", ()))})
        self.judge = Judge(engine=build_engine(EngineSpec.from_dict(engine)), **kw)
        self.n_cots, self.mode = n_cots, mode

    def run_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        exs = [JudgeExample.from_dict(json.loads(r["example"])) for r in rows]
        results = self.judge.score_batch(exs, n_cots=self.n_cots, mode=self.mode)  # type: ignore[arg-type]
        return [prediction_row(ex, r.score, r.failure, r.to_dict()) for ex, r in zip(exs, results)]

    def failed(self, row: dict[str, Any], reason: str) -> dict[str, Any]:
        return prediction_row(JudgeExample.from_dict(json.loads(row["example"])), None, reason, {})


def prediction_row(ex: JudgeExample, score: float | None, failure: str | None,
                   detail: dict[str, Any]) -> dict[str, Any]:
    """One line of predictions.jsonl (details as JSON text: Arrow needs one type per column)."""
    return {"id": ex.id, "prediction": score, "gold": float(ex.score), "category": ex.category or "",
            "failure": failure or "", "detail": json.dumps(detail, ensure_ascii=False)}


class PairWorker(JudgeWorker):
    """Relative benchmarks: columns id, pair (JSON) -> one row per pair with p(A) in the given order
    (``prediction``) and in the swapped order (``swapped``, the position-swap check); both orders of a batch are
    judged in one engine batch."""

    def __init__(self, engine: dict[str, Any], judge_kwargs: dict[str, Any], n_cots: int, mode: str):
        from tract_dist.judge.relative import PairJudge

        super().__init__(engine, judge_kwargs, n_cots, mode)
        self.pair_judge = PairJudge(self.judge)
        self.n_cots = 1 if n_cots == "auto" else n_cots  # an adaptive count is absolute grading's (ŷ's error)

    def run_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from tract_dist.data.relative import PairExample

        pairs = [PairExample.from_dict(json.loads(r["pair"])) for r in rows]
        results = self.pair_judge.grade_batch(pairs, n_cots=self.n_cots, mode=self.mode, swap=True)  # type: ignore
        return [pair_row(p, r.p_a, r.swapped.p_a if r.swapped else None, r.failure or (r.swapped.failure if
                         r.swapped else None), r.to_dict()) for p, r in zip(pairs, results)]

    def failed(self, row: dict[str, Any], reason: str) -> dict[str, Any]:
        from tract_dist.data.relative import PairExample

        return pair_row(PairExample.from_dict(json.loads(row["pair"])), None, None, reason, {})


def pair_row(pair: Any, p_a: float | None, swapped: float | None, failure: str | None,
             detail: dict[str, Any]) -> dict[str, Any]:
    """One line of a relative benchmark's predictions.jsonl: p(A) both ways and the gold preference."""
    return {"id": pair.id, "prediction": p_a, "swapped": swapped, "gold": float(pair.preference),
            "category": pair.category or "", "failure": failure or "", "detail": json.dumps(detail, ensure_ascii=False)}
