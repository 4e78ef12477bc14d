"""The judging replica for evaluation: the same pool machinery as generation, with a ``Judge`` inside (on the
engine of ``evaluation.backend``: CoTs and their RAIL read-out come from one engine, so vLLM's prefix cache
serves the read-out)."""

from __future__ import annotations

import json
from typing import Any

from tract_dist.data.schema import JudgeExample
from tract_dist.runtime.engine import EngineSpec
from tract_dist.runtime.pool import rows_of
from tract_dist.runtime.sampling import SamplingParams


class JudgeWorker:
    """Callable class for ``map_batches``: columns id, example (JSON) -> one prediction row per input."""

    def __init__(self, engine: dict[str, Any], judge_kwargs: dict[str, Any], n_cots: int, mode: str):
        from tract_dist.judge.judge import Judge
        from tract_dist.runtime.backend import build_engine

        kw = dict(judge_kwargs)
        s = kw["sampling"]
        kw["sampling"] = SamplingParams(**{**s, "stop": tuple(s.get("stop", ()))})
        self.judge = Judge(engine=build_engine(EngineSpec.from_dict(engine)), **kw)
        self.n_cots, self.mode = n_cots, mode

    def _run(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        exs = [JudgeExample.from_dict(json.loads(r["example"])) for r in rows]
        results = self.judge.score_batch(exs, n_cots=self.n_cots, mode=self.mode)  # type: ignore[arg-type]
        return [prediction_row(ex, r.score, r.failure, r.to_dict()) for ex, r in zip(exs, results)]

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        rows = rows_of(batch)
        try:
            preds = self._run(rows)
        except Exception:  # isolate the failing input(s)
            preds = []
            for row in rows:
                try:
                    preds += self._run([row])
                except Exception as e:  # noqa: BLE001 - counted as a failed prediction with its reason
                    ex = JudgeExample.from_dict(json.loads(row["example"]))
                    preds.append(prediction_row(ex, None, f"error: {type(e).__name__}: {e}"[:500], {}))
        return {k: [p[k] for p in preds] for k in preds[0]}


def prediction_row(ex: JudgeExample, score: float | None, failure: str | None,
                   detail: dict[str, Any]) -> dict[str, Any]:
    """One line of predictions.jsonl (details as JSON text: Arrow needs one type per column)."""
    return {"id": ex.id, "prediction": score, "gold": float(ex.score), "category": ex.category or "",
            "failure": failure or "", "detail": json.dumps(detail, ensure_ascii=False)}
