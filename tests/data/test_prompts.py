import pytest

from tract_dist.data.prompts import normalize_feedback, parse_prompt, render_prompt, render_target, score_text
from tract_dist.data.schema import JudgeExample


def _ex(ref):
    return JudgeExample(id="a", instruction="Add 2 and 2.\nInput: none", response="It is 4.\n\nDone.",
                        criteria="Is it correct?", score_descriptions=[f"desc {k}" for k in range(1, 6)],
                        score=4, reference_answer=ref, feedback="ok")


@pytest.mark.parametrize("ref", [None, "4"])
def test_render_parse_round_trip(ref):
    text = render_prompt(_ex(ref))
    p = parse_prompt(text)
    assert p["instruction"] == "Add 2 and 2.\nInput: none"
    assert p["response"] == "It is 4.\n\nDone."
    assert p["reference_answer"] == ref
    assert p["score_descriptions"] == [f"desc {k}" for k in range(1, 6)]
    assert ("###Reference Answer (Score 5):\n4\n\n" in text) == (ref is not None)
    assert text.endswith("Score 5: desc 5\n\n###Feedback: ")
    assert "a reference answer that gets a score of 5" in text if ref else "a reference answer" not in text


def test_parse_rejects_other_layouts():
    with pytest.raises(ValueError, match="###Score Rubrics:"):
        parse_prompt("###Task Description:\nfoo\n\n###The instruction to evaluate:\nx\n\n###Response to evaluate:\ny")


@pytest.mark.parametrize("raw,clean", [
    ("Feedback: Good work. [RESULT] 4", "Good work."),
    ("Good work. So the overall score is 4.", "Good work."),
    ("Good work.\n[RESULT] (3)", "Good work."),
    ("Scores 4 points of detail. Great.", "Scores 4 points of detail. Great."),
    ("Good. So the overall score is 4 [RESULT] 4", "Good."),
])
def test_normalize_feedback(raw, clean):
    assert normalize_feedback(raw) == clean


def test_target_and_rounding():
    assert render_target("Fine.", 3) == "Fine. So the overall score is 3"
    assert score_text(3.67) == "4" and score_text(3.5) == "4" and score_text(3.33) == "3"
    assert score_text(9, 1, 5) == "5"
