"""The adaptive CoT count (evaluation.num_cots: auto, judge/adaptive.py): the stopping rule on stub ŷ sequences,
and the judge's rounds on a stub engine whose CoTs read out to a prescribed ŷ sequence (#24)."""

from __future__ import annotations

import math
import statistics

import pytest

from tract_dist.judge.adaptive import MIN_COTS, converged, next_count, standard_error
from tract_dist.runtime.engine import Generation


def test_standard_error_is_sample_sd_over_root_n():
    assert standard_error([3.0]) == math.inf
    ys = [2.0, 4.0, 3.0, 3.5]
    assert standard_error(ys) == pytest.approx(statistics.stdev(ys) / 2.0)


@pytest.mark.parametrize("ys, target, max_cots, done, nxt", [
    ([], 0.1, 8, False, 3),  # the first round draws MIN_COTS
    ([4.0, 4.0], 0.1, 8, False, 3),  # agreeing CoTs never stop before MIN_COTS
    ([4.0, 4.0, 4.0], 0.1, 8, True, 3),  # se 0: stop at 3
    ([3.9, 4.1, 4.0], 0.1, 8, True, 3),  # sd 0.1, se 0.058
    ([3.0, 4.0, 5.0], 0.5, 8, False, 4),  # sd 1, se 0.577 > 0.5; (1 / 0.5)^2 = 4 CoTs are needed
    ([1.0, 5.0, 1.0], 0.1, 8, False, 8),  # (2.31 / 0.1)^2 = 534: capped at max_cots
    ([1.0, 5.0, 1.0, 5.0, 1.0, 5.0, 1.0, 5.0], 0.1, 8, True, 8),  # max_cots reached: stop whatever the se
    ([2.0, 2.2, 2.4], 0.1, 8, False, 4),  # sd 0.2, se 0.115; (0.2 / 0.1)^2 = 4
    ([2.0, 2.2, 2.4, 2.2], 0.1, 8, True, 4),  # sd 0.163, se 0.082
])
def test_stopping_rule_on_stub_sequences(ys, target, max_cots, done, nxt):
    assert converged(ys, target, max_cots) is done
    assert next_count(ys, target, max_cots) == nxt


def _simulate(stream: list[float], target: float, max_cots: int) -> tuple[int, list[int]]:
    """Drive the rule over a stub ŷ stream as the judge does: (CoTs drawn, count after each round)."""
    have: list[float] = []
    rounds = []
    while not converged(have, target, max_cots):
        have = stream[:next_count(have, target, max_cots)]
        rounds.append(len(have))
    return len(have), rounds


@pytest.mark.parametrize("stream, target, want_n, want_rounds", [
    ([3.0] * 20, 0.1, 3, [3]),
    ([3.0, 3.3, 2.7, 3.1, 2.9, 3.0, 3.2, 2.8], 0.1, 8, [3, 8]),  # s = 0.3: (0.3 / 0.1)^2 = 9 needed, 8 allowed
    ([3.0, 3.1, 2.9, 3.15, 2.85, 3.0, 3.05, 2.95], 0.05, 7, [3, 5, 7]),  # rounds follow the estimate as it moves
    ([4.2, 4.0, 4.1, 2.0, 4.1, 4.0, 4.1, 4.2], 0.5, 3, [3]),  # the outlier comes after the stop
    ([4.2, 4.0, 1.5, 4.1, 4.0, 4.1, 4.2, 4.0], 0.5, 8, [3, 8]),  # one outlier: s = 1.5, (1.5 / 0.5)^2 = 9 -> 8
])
def test_rounds_on_a_stub_stream(stream, target, want_n, want_rounds):
    n, rounds = _simulate(stream, target, 8)
    assert (n, rounds) == (want_n, want_rounds)
    # the rule holds at the stop and at no earlier round's end
    assert n == 8 or standard_error(stream[:n]) <= target
    assert all(standard_error(stream[:k]) > target for k in rounds[:-1])


class StubEngine:
    """Generates "verdict <j>" for CoT j of an input; its read-out puts ŷ on the two score tokens around the
    prescribed value of that CoT (exact: ŷ = Σ v p). Counts calls."""

    backend = "stub"

    def __init__(self, tokenizer, streams: dict[str, list[float]], seed: int):
        from tract_dist.runtime.sampling import example_seed

        self.tokenizer = tokenizer
        self.streams = streams
        self.by_seed = {example_seed(seed, ex, j): (ex, j) for ex in streams for j in range(20)}
        self.calls: list[int] = []

    def generate(self, prompts, seeds, params):
        self.calls.append(len(prompts))
        out = []
        for s in seeds:
            ex, j = self.by_seed[s]
            out.append(Generation(text=f"input {ex} verdict {j}.", new_tokens=4, finish_reason="eos"))
        return out

    def score_probs(self, sequences, token_ids):
        import re

        out = []
        for seq in sequences:
            ex, j = re.findall(r"input (\S+) verdict (\d+)\.", self.tokenizer.decode(seq))[-1]
            y = self.streams[ex][int(j)]
            lo = math.floor(y)
            p = [0.0] * 5
            p[lo - 1] += 1.0 - (y - lo)
            if y > lo:
                p[lo] += y - lo
            out.append(p)
        return out


def test_judge_auto_samples_rounds_until_the_standard_error_is_reached(tiny_export):
    from tract_dist.judge import Judge
    from tract_dist.models.loading import load_tokenizer_for

    streams = {"steady": [3.0] * 10, "noisy": [3.0, 3.3, 2.7, 3.1, 2.9, 3.0, 3.2, 2.8],
               "split": [4.2, 4.0, 1.5, 4.1, 4.0, 4.1, 4.2, 4.0]}
    engine = StubEngine(load_tokenizer_for(tiny_export), streams, seed=7)
    judge = Judge(engine=engine, seed=7, cot_se_target=0.1, max_cots=8)
    fields = {"instruction": "i", "response": "r", "criteria": "c", "score_descriptions": list("abcde")}
    res = judge.score_batch([{**fields, "id": k} for k in streams], n_cots="auto")
    assert [len(r.per_cot) for r in res] == [3, 8, 8]
    for r, k in zip(res, streams):
        assert r.per_cot == pytest.approx(streams[k][:len(r.per_cot)], abs=1e-12)
        assert r.score == pytest.approx(statistics.fmean(streams[k][:len(r.per_cot)]), abs=1e-12)
        assert r.cots == [f"input {k} verdict {j}." for j in range(len(r.per_cot))]
    # one batched generation call per round: 3 inputs x 3, then the two unfinished ones up to their estimates
    assert engine.calls[0] == 3 * MIN_COTS and len(engine.calls) <= 4 and sum(engine.calls) == 3 + 8 + 8
    with pytest.raises(ValueError, match="decode"):
        judge.score_batch([{**fields, "id": "steady"}], n_cots="auto", mode="decode")
