"""The decode baseline: parsing the written score, counting what cannot be parsed."""

from __future__ import annotations

import pytest

from tract_dist.runtime.engine import Generation
from tract_dist.runtime.hf_engine import HFEngine as Engine
from tract_dist.judge import parse_decoded_score


@pytest.mark.parametrize("text,want", [
    ("Good. So the overall score is 4", (4.0, None)),
    ("Feedback: fine [RESULT] 3", (3.0, None)),
    ("ok [RESULT] (5)", (5.0, None)),
    ("So the overall score is 4.5.", (4.5, None)),
    ("So the overall score is 9. Actually [RESULT] 2", (2.0, None)),
    ("no score at all", (None, "no_score_statement")),
    ("[RESULT] 7", (None, "out_of_scale")),
    ("So the overall score is", (None, "no_score_statement")),
])
def test_parse_decoded_score(text, want):
    assert parse_decoded_score(text, (1, 5)) == want


def test_decode_mode_averages_parsed_scores_and_counts_failures(tiny_export, quickstart_examples, monkeypatch):
    from tract_dist.judge import Judge

    judge = Judge.from_pretrained(tiny_export, max_length=4096)
    canned = iter(["A. So the overall score is 4", "B. [RESULT] 2",  # example 0
                   "gibberish", "[RESULT] 9"])  # example 1: nothing usable

    def fake_generate(self, prompts, seeds, params):
        assert params.stop == ()  # decode must see the score it writes
        return [Generation(text=next(canned), new_tokens=5, finish_reason="eos") for _ in prompts]

    monkeypatch.setattr(Engine, "generate", fake_generate)
    r0, r1 = judge.score_batch(quickstart_examples[:2], n_cots=2, mode="decode")
    assert r0.score == 3.0 and r0.per_cot == [4.0, 2.0] and r0.unparseable == 0
    assert r1.score is None and r1.unparseable == 2
    assert r1.failure == "unparseable: no_score_statement,out_of_scale"
