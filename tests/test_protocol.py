"""The protocol constants do what the three sides need of them together: a target rendered for training is
parsed back to its score by the decode parser, the default stop strings cut a generated answer exactly where
the score phrase starts (so inference re-appends the phrase training used), and the label that masks a position
is the one torch's cross-entropy ignores."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tract_dist.config import GenerationSection
from tract_dist.data.encode import EncodeOptions, encode_example
from tract_dist.data.prompts import normalize_feedback, render_prompt, render_target
from tract_dist.data.schema import JudgeExample
from tract_dist.data.score_tokens import derive_score_tokens
from tract_dist.judge.parsing import parse_decoded_score
from tract_dist.protocol import IGNORE_INDEX, RESULT_MARKER, SCORE_PHRASE, STOP_STRINGS
from tract_dist.runtime.engine import cut_at_stop, extract_cot
from tract_dist.runtime.sampling import SamplingParams


def _ex(**kw):
    d = dict(id="a", instruction="Add 2 and 2.", response="It is 4.", criteria="Is it correct?",
             score_descriptions=[f"desc {k}" for k in range(1, 6)], score=4.0, feedback="Correct and brief.")
    d.update(kw)
    return JudgeExample(**d)


# (feedback, gold score, scale, the integer a reader must find: gold rounded half up, clipped to the scale)
@pytest.mark.parametrize("feedback,gold,scale,want", [
    ("The answer is right and explains why.", 4.0, (1, 5), 4.0),
    ("Half-way between two scores.", 3.5, (1, 5), 4.0),
    ("", 2.0, (1, 5), 2.0),  # score-only target (RAFT without CoT)
    ("Mentions [RESULT] markers and 7 numbers in passing.", 7.0, (1, 10), 7.0),
    ("Above the scale.", 9.0, (1, 5), 5.0),
])
def test_a_rendered_target_parses_back_to_its_score(feedback, gold, scale, want):
    target = render_target(feedback, gold, *scale)
    score, why = parse_decoded_score(target, scale)
    assert (score, why) == (want, None)


@pytest.mark.parametrize("feedback", ["The answer is right and explains why.", "Two lines.\nSecond line."])
@pytest.mark.parametrize("tail", ["", f" {RESULT_MARKER} 4", " and more text the model wrote"])
def test_default_stop_strings_cut_a_rendered_target_just_before_the_score_phrase(feedback, tail):
    stop = SamplingParams.from_config(GenerationSection()).stop  # what a default config generates with
    generated = render_target(feedback, 4) + tail
    assert cut_at_stop(generated, stop) == generated[:generated.index(SCORE_PHRASE)]
    cot = extract_cot(generated, stop)
    assert cot == feedback
    # Inference re-appends the score phrase: the result is the training target, with the score stated once.
    assert render_target(cot, 4) == render_target(feedback, 4)
    assert render_target(cot, 4).count(SCORE_PHRASE) == 1


def test_a_prometheus_style_answer_stops_at_the_result_marker_the_prompt_asks_for():
    prompt = render_prompt(_ex())
    assert f"{RESULT_MARKER} (an integer number between 1 and 5)" in prompt  # the format the model is told
    answer = f"Feedback: Correct and brief. {RESULT_MARKER} 4"
    assert parse_decoded_score(answer, (1, 5)) == (4.0, None)
    assert extract_cot(answer, STOP_STRINGS) == "Correct and brief."


def test_source_feedback_and_dangling_markers_lose_their_score_statements():
    # Trailing statements in source feedback: the target must state its score once, after the phrase.
    assert normalize_feedback(f"Good. {SCORE_PHRASE} 4. {RESULT_MARKER} 4") == "Good."
    assert normalize_feedback("Good. Score: 4/5") == "Good."
    # A score phrase the model left without a number (no stop strings given) is removed from the CoT.
    assert extract_cot(f"Good. {SCORE_PHRASE} {RESULT_MARKER}", ()) == "Good."


def test_ignore_index_is_the_label_torch_cross_entropy_skips(tokenizers):
    assert IGNORE_INDEX == torch.nn.CrossEntropyLoss().ignore_index
    tok = tokenizers["mistral"]
    st = derive_score_tokens(tok, (1, 5))
    enc = encode_example(tok, _ex(), st, EncodeOptions())
    labels = torch.tensor(enc.labels)
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()
    torch.manual_seed(0)
    logits = torch.randn(len(labels), len(tok), dtype=torch.float64)
    got = torch.nn.functional.cross_entropy(logits, labels)
    # Independent reference: mean negative log-likelihood over the positions encode meant to train.
    keep = [i for i, y in enumerate(enc.labels) if y != IGNORE_INDEX]
    logp = torch.log_softmax(logits, dim=-1)
    want = -torch.stack([logp[i, enc.labels[i]] for i in keep]).mean()
    torch.testing.assert_close(got, want)
    # The score token is among the masked positions: it is learnt through the regression term only.
    assert enc.labels[enc.score_position + 1] == IGNORE_INDEX
    assert enc.input_ids[enc.score_position + 1] == enc.score_token_id


def test_protocol_and_its_light_users_import_without_torch():
    code = ("import sys, tract_dist.protocol, tract_dist.config, tract_dist.data.prompts; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
