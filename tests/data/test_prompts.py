import random
import re
import time

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


# The regex parse_prompt used before it became linear (#22): the reference its results must equal on prompts
# where it terminates quickly (each section header once).
_OLD_PARSE = re.compile(
    r"\A###Task Description:\n.*?\n\n"
    r"###The instruction to evaluate:\n(?P<instruction>.*?)\n\n"
    r"###Response to evaluate:\n(?P<response>.*?)\n\n"
    r"(?:###Reference Answer \(Score (?P<refmax>\d+)\):\n(?P<reference>.*?)\n\n)?"
    r"###Score Rubrics:\n\[(?P<criteria>.*?)\]\n(?P<scores>Score .*?)\n\n###Feedback: ?\Z",
    re.S,
)


def _old_parse(text):
    m = _OLD_PARSE.match(text)
    if m is None:
        return None
    starts = list(re.finditer(r"^Score (\d+): ", m.group("scores"), re.M))
    values = [int(s.group(1)) for s in starts]
    if not values or values != list(range(values[0], values[0] + len(values))):
        return None
    descs = [m.group("scores")[s.end():(starts[i + 1].start() - 1 if i + 1 < len(starts) else None)]
             for i, s in enumerate(starts)]
    return {"instruction": m.group("instruction"), "response": m.group("response"),
            "reference_answer": m.group("reference"), "criteria": m.group("criteria"), "score_descriptions": descs,
            "scale_min": values[0], "scale_max": values[-1]}


def test_split_equals_the_old_regex_on_awkward_fields():
    """Fields full of the characters the layout is made of (blank lines, brackets, "Score k:" lines, "###"):
    the linear split gives exactly what the old regex gave, or both refuse."""
    rng = random.Random(0)
    atoms = ["\n", "\n\n", "]", "[", "Score 3: ", "]\nScore 2: x", "### ", "Feedback:", "a", " ", "(Score 5)"]
    agreed = refused = 0
    for trial in range(400):
        def text(pool=atoms):
            return "x" + "".join(rng.choice(pool) for _ in range(rng.randint(0, 8))) + "y"
        desc_atoms = atoms if trial % 4 == 0 else [a for a in atoms if "Score" not in a]
        ex = JudgeExample(id="t", instruction=text(), response=text(), criteria=text(),
                          score_descriptions=[text(desc_atoms) for _ in range(5)], score=3,
                          reference_answer=text() if trial % 2 else None)
        prompt = render_prompt(ex)
        want = _old_parse(prompt)
        if want is None:
            with pytest.raises(ValueError):
                parse_prompt(prompt)
            refused += 1
        else:
            assert parse_prompt(prompt) == want
            agreed += 1
    assert agreed > 100 and refused > 20  # both branches exercised


def test_repeated_markers_are_refused_in_linear_time():
    """The prompt that stalled the judge server (#22: the section headers repeated; the old regex took ~m^4.5
    steps), at ten times the reported size (1050 repeats, ~130 KB): refused at once, naming the marker."""
    block = ("###Task Description:\nx\n\n###The instruction to evaluate:\nWhy?\n\n###Response to evaluate:\nr\n\n"
             "###Score Rubrics:\n[c]\nScore 1: a\n\n")
    prompt = block * 1050 + "###Feedback: "
    assert len(prompt) > 130_000
    t = time.perf_counter()
    with pytest.raises(ValueError, match="section marker '###Task Description:' 1050 times"):
        parse_prompt(prompt)
    without_header = prompt.replace("###Task Description:", "###Task:")
    with pytest.raises(ValueError, match="section '###Task Description:' missing"):
        parse_prompt(without_header)
    assert time.perf_counter() - t < 0.5  # microseconds of str.count; the regex needed minutes at 105 repeats
    with pytest.raises(ValueError, match="out of the expected layout"):  # each header once, in the wrong order
        parse_prompt("###Task Description:\n\n\n###Response to evaluate:\nr\n\n###The instruction to evaluate:\n"
                     "i\n\n###Score Rubrics:\n[c]\nScore 1: a\n\n###Feedback: ")
