"""Prometheus absolute-grading prompt layouts and the TRACT training target.

The layouts reproduce prometheus-eval's ABSOLUTE_PROMPT / ABSOLUTE_PROMPT_WO_REF byte for byte (the tests
round-trip the real Vicuna Bench prompts through parse -> render), so a model trained here sees exactly the
prompts the public benchmarks use.
"""

from __future__ import annotations

import re
from typing import Any

from tract_dist.data.schema import JudgeExample
from tract_dist.protocol import SCORE_PHRASE, TRAILING_SCORE_RE

ABS_SYSTEM_PROMPT = (
    "You are a fair judge assistant tasked with providing clear, objective feedback based on specific criteria, "
    "ensuring each assessment reflects the absolute standards set for performance."
)

_HEADER_REF = (
    "###Task Description:\n"
    "An instruction (might include an Input inside it), a response to evaluate, a reference answer that gets a "
    "score of {max}, and a score rubric representing a evaluation criteria are given.\n"
)
_HEADER_NOREF = (
    "###Task Description:\n"
    "An instruction (might include an Input inside it), a response to evaluate, and a score rubric representing "
    "a evaluation criteria are given.\n"
)
# Prometheus' words verbatim; the "[RESULT]" they ask for is protocol.RESULT_MARKER, where generation stops.
_STEPS = (
    "1. Write a detailed feedback that assess the quality of the response strictly based on the given score "
    "rubric, not evaluating in general.\n"
    "2. After writing a feedback, write a score that is an integer between {min} and {max}. You should refer to "
    "the score rubric.\n"
    '3. The output format should look as follows: "Feedback: (write a feedback for criteria) [RESULT] (an integer '
    'number between {min} and {max})"\n'
    "4. Please do not generate any other opening, closing, and explanations.\n\n"
)
_INSTR = "###The instruction to evaluate:\n{instruction}\n\n###Response to evaluate:\n{response}\n\n"
_REF = "###Reference Answer (Score {max}):\n{reference}\n\n"
_RUBRIC = "###Score Rubrics:\n{rubric}\n\n###Feedback: "


def render_rubric(criteria: str, descriptions: list[str], scale_min: int = 1) -> str:
    """``[criteria]`` then one ``Score k: description`` line per score, as Prometheus writes it."""
    lines = [f"[{criteria}]"]
    lines += [f"Score {scale_min + i}: {d}" for i, d in enumerate(descriptions)]
    return "\n".join(lines)


def render_prompt(ex: JudgeExample, scale_min: int = 1, scale_max: int = 5) -> str:
    """The user turn of the Prometheus absolute-grading prompt (with or without a reference answer)."""
    has_ref = ex.reference_answer is not None and ex.reference_answer != ""
    text = (_HEADER_REF if has_ref else _HEADER_NOREF).format(max=scale_max)
    text += _STEPS.format(min=scale_min, max=scale_max)
    text += _INSTR.format(instruction=ex.instruction, response=ex.response)
    if has_ref:
        text += _REF.format(max=scale_max, reference=ex.reference_answer)
    text += _RUBRIC.format(rubric=render_rubric(ex.criteria, ex.score_descriptions, scale_min))
    return text


_PARSE = re.compile(
    r"\A###Task Description:\n.*?\n\n"
    r"###The instruction to evaluate:\n(?P<instruction>.*?)\n\n"
    r"###Response to evaluate:\n(?P<response>.*?)\n\n"
    r"(?:###Reference Answer \(Score (?P<refmax>\d+)\):\n(?P<reference>.*?)\n\n)?"
    r"###Score Rubrics:\n\[(?P<criteria>.*?)\]\n(?P<scores>Score .*?)\n\n###Feedback: ?\Z",
    re.S,
)
_SCORE_LINE = re.compile(r"^Score (\d+): ", re.M)


def parse_prompt(text: str) -> dict[str, Any]:
    """Split a formatted Prometheus prompt back into its fields (the inverse of :func:`render_prompt`).

    Raises ``ValueError`` naming the section that could not be found.
    """
    m = _PARSE.match(text)
    if m is None:
        for marker in ("###Task Description:", "###The instruction to evaluate:", "###Response to evaluate:",
                       "###Score Rubrics:", "###Feedback:"):
            if marker not in text:
                raise ValueError(f"not a Prometheus absolute-grading prompt: section '{marker}' missing")
        raise ValueError("not a Prometheus absolute-grading prompt: sections are out of the expected layout")
    scores_text = m.group("scores")
    starts = list(_SCORE_LINE.finditer(scores_text))
    values = [int(s.group(1)) for s in starts]
    if not values or values != list(range(values[0], values[0] + len(values))):
        raise ValueError(f"rubric score lines are not consecutive: {values}")
    descriptions = []
    for i, s in enumerate(starts):
        end = starts[i + 1].start() - 1 if i + 1 < len(starts) else len(scores_text)
        descriptions.append(scores_text[s.end():end])
    return {
        "instruction": m.group("instruction"),
        "response": m.group("response"),
        "reference_answer": m.group("reference"),
        "criteria": m.group("criteria"),
        "score_descriptions": descriptions,
        "scale_min": values[0],
        "scale_max": values[-1],
    }


SECTION_MARKERS = ("###Task Description:", "###The instruction to evaluate:", "###Response to evaluate:",
                   "###Reference Answer (Score", "###Score Rubrics:", "###Feedback:")


def section_marker_counts(text: str) -> dict[str, int]:
    """How often each Prometheus section header occurs in a prompt (once each in a well-formed one)."""
    return {m: text.count(m) for m in SECTION_MARKERS}


_LEADING_FEEDBACK = re.compile(r"\A\s*(?:Feedback:)\s*", re.I)


def normalize_feedback(text: str) -> str:
    """Strip a leading ``Feedback:`` and any trailing score statement, so the target states the score once."""
    text = _LEADING_FEEDBACK.sub("", text)
    text = TRAILING_SCORE_RE.sub("", text)
    return text.strip()


def score_text(score: float, scale_min: int = 1, scale_max: int = 5) -> str:
    """The integer written after the score phrase: the gold score rounded half up and clipped to the scale."""
    k = int(score + 0.5) if score >= 0 else int(score - 0.5)
    return str(min(max(k, scale_min), scale_max))


def render_target(feedback: str, score: float, scale_min: int = 1, scale_max: int = 5) -> str:
    """TRACT's training target (EOS is appended at tokenisation): ``{feedback} So the overall score is {y*}``.

    An empty feedback gives the score-only target ``So the overall score is {y*}`` (RAFT without CoT).
    """
    head = f"{feedback} " if feedback else ""
    return f"{head}{SCORE_PHRASE} {score_text(score, scale_min, scale_max)}"
