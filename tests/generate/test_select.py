"""Stage-2 selection rules (generate/select.py) on fixed RAIL read-outs: what each rule keeps, its weights, the
fallback for prompts without an acceptable CoT, and the counts it reports (#24)."""

from __future__ import annotations

import math

import pytest

from tract_dist.generate.select import Candidate, SelectionSpec, select_cots, summary_line

# Three prompts with k = 4 CoTs each, gold y* and the CoTs' read-outs ŷ (errors in the comments, τ = 0.5).
READOUTS = {
    "a": (4.0, [3.9, 2.1, 4.4, 3.2]),  # errors 0.1, 1.9, 0.4, 0.8: two acceptable
    "b": (2.0, [3.1, 3.6, 0.8, 3.3]),  # errors 1.1, 1.6, 1.2, 1.3: none acceptable, nearest is #0
    "c": (5.0, [4.7, 4.7, 1.0, None]),  # errors 0.3, 0.3 (a tie), 4.0, and one CoT without a read-out
}


def _cands() -> list[Candidate]:
    return [Candidate(uid=f"{p}#cot{j}", prompt=p, index=j, yhat=y, gold=gold)
            for p, (gold, ys) in READOUTS.items() for j, y in enumerate(ys)]


def _kept(rule: str, fallback: str = "nearest", tau: float = 0.5) -> tuple[dict[str, float], dict]:
    kept, stats = select_cots(_cands(), SelectionSpec(rule, tau, fallback))
    return {c.uid: w for c, w in kept}, stats


def test_all_keeps_everything_with_weight_one():
    kept, s = _kept("all", fallback="drop")  # no selection: the fallback does not apply
    assert kept == {c.uid: 1.0 for c in _cands()}
    assert (s["kept"], s["dropped"], s["prompts_dropped"], s["no_readout"]) == (12, 0, 0, 1)
    assert s["prompts_without_acceptable"] == 1  # prompt b
    errors = [0.1, 1.9, 0.4, 0.8, 1.1, 1.6, 1.2, 1.3, 0.3, 0.3, 4.0]
    assert s["mae_before"] == pytest.approx(sum(errors) / 11) == pytest.approx(s["mae_after"])
    assert s["within_0.5_before"] == pytest.approx(4 / 11)


def test_nearest_one_per_prompt_ties_to_the_lower_index():
    kept, s = _kept("nearest")
    assert kept == {"a#cot0": 1.0, "b#cot0": 1.0, "c#cot0": 1.0}
    assert (s["kept"], s["prompts_kept"], s["prompts_kept_by_fallback"], s["prompts_dropped"]) == (3, 3, 1, 0)
    assert s["mae_after"] == pytest.approx((0.1 + 1.1 + 0.3) / 3)
    assert s["within_0.5_after"] == pytest.approx(2 / 3)
    kept, s = _kept("nearest", fallback="drop")
    assert kept == {"a#cot0": 1.0, "c#cot0": 1.0}
    assert (s["prompts_dropped"], s["dropped"], s["mae_after"]) == (1, 10, pytest.approx(0.2))


def test_within_keeps_every_acceptable_cot():
    kept, s = _kept("within")
    assert kept == {"a#cot0": 1.0, "a#cot2": 1.0, "b#cot0": 1.0, "c#cot0": 1.0, "c#cot1": 1.0}
    assert s["within_tolerance_after"] == pytest.approx(4 / 5)  # b's fallback CoT is the one outside
    kept, s = _kept("within", fallback="drop")
    assert set(kept) == {"a#cot0", "a#cot2", "c#cot0", "c#cot1"} and s["within_tolerance_after"] == 1.0
    kept, _ = _kept("within", tau=1.0)
    assert set(kept) == {"a#cot0", "a#cot2", "a#cot3", "c#cot0", "c#cot1", "b#cot0"}  # b: none within 1.0 either


def test_weighted_is_the_per_prompt_posterior_times_the_count():
    kept, s = _kept("weighted")
    tau = 0.5
    for p, (gold, ys) in READOUTS.items():
        read = [(j, y) for j, y in enumerate(ys) if y is not None]
        lik = [math.exp(-((y - gold) ** 2) / (2 * tau * tau)) for _, y in read]
        for (j, _), li in zip(read, lik):
            assert kept[f"{p}#cot{j}"] == pytest.approx(len(read) * li / sum(lik), rel=1e-12)
        assert sum(kept[f"{p}#cot{j}"] for j, _ in read) == pytest.approx(len(read))  # mean 1 per prompt
    assert "c#cot3" not in kept and s["no_readout"] == 1  # no read-out: left out and counted
    assert kept["c#cot2"] < 1e-12  # error 4.0: far below any other weight, without underflow to NaN
    assert kept["a#cot0"] > kept["a#cot2"] > kept["a#cot3"] > kept["a#cot1"]  # falls with the error
    assert s["weight_max"] == pytest.approx(max(kept.values()))
    # weighted means: the kept CoTs' read-outs are closer to y* than before selection
    assert s["mae_after"] < s["mae_before"] and s["within_0.5_after"] > s["within_0.5_before"]
    kept, s = _kept("weighted", fallback="drop")
    assert not any(u.startswith("b#") for u in kept) and s["prompts_dropped"] == 1


def test_spec_validation_and_summary_line():
    with pytest.raises(ValueError, match="tolerance > 0"):
        SelectionSpec("weighted", 0.0)
    with pytest.raises(ValueError, match="select rule"):
        SelectionSpec("best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fallback"):
        SelectionSpec("nearest", 0.5, "keep")  # type: ignore[arg-type]
    _, s = _kept("nearest", fallback="drop")
    line = summary_line(s)
    assert "select=nearest" in line and "kept 2 of 12 CoTs for 2 of 3 prompts" in line and "1 CoTs had no read-out" in line
