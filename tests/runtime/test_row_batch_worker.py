"""The pool workers' shared retry: a batch that raises is redone row by row, so only the row to blame fails,
with its error as the reason, and every input row still yields exactly one result row."""

from __future__ import annotations

import numpy as np

from tract_dist.runtime.pool import RowBatchWorker


class _Doubler(RowBatchWorker):
    """Doubles ``x``; any batch holding a negative ``x`` raises (as an engine does for one bad prompt)."""

    def __init__(self):
        self.calls: list[list[int]] = []

    def run_rows(self, rows):
        self.calls.append([r["x"] for r in rows])
        if any(r["x"] < 0 for r in rows):
            raise ValueError(f"negative input {min(r['x'] for r in rows)}" + "!" * 600)
        return [{"id": r["id"], "y": 2 * r["x"], "failure": ""} for r in rows]

    def failed(self, row, reason):
        return {"id": row["id"], "y": None, "failure": reason}


def test_a_failing_batch_is_retried_row_by_row_and_only_the_bad_row_fails():
    w = _Doubler()
    out = w({"id": np.array(["a", "b", "c"]), "x": np.array([1, -2, 3])})  # Ray Data hands numpy columns
    assert out["id"] == ["a", "b", "c"]
    assert out["y"] == [2, None, 6]
    assert out["failure"][0] == out["failure"][2] == ""
    assert out["failure"][1].startswith("error: ValueError: negative input -2") and len(out["failure"][1]) == 500
    assert w.calls == [[1, -2, 3], [1], [-2], [3]]


def test_a_good_batch_runs_once():
    w = _Doubler()
    assert w({"id": ["a", "b"], "x": [4, 5]}) == {"id": ["a", "b"], "y": [8, 10], "failure": ["", ""]}
    assert w.calls == [[4, 5]]
