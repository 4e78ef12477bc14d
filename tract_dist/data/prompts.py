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


SECTION_MARKERS = ("###Task Description:", "###The instruction to evaluate:", "###Response to evaluate:",
                   "###Reference Answer (Score", "###Score Rubrics:", "###Feedback:")
_TASK, _INSTRUCTION, _RESPONSE, _REFERENCE, _RUBRICS, _FEEDBACK = SECTION_MARKERS
_SCORE_LINE = re.compile(r"^Score (\d{1,9}): ", re.M)  # bounded: int() of a huge digit run is itself costly
_REF_HEAD = re.compile(r"###Reference Answer \(Score \d{1,9}\):\n")  # anchored with .match: constant work


def section_marker_counts(text: str) -> dict[str, int]:
    """How often each Prometheus section header occurs in a prompt (once each in a well-formed one)."""
    return {m: text.count(m) for m in SECTION_MARKERS}


def check_section_counts(counts: dict[str, int], required: tuple[str, ...], kind: str) -> None:
    """A prompt of ``kind`` grading can be split only when every ``required`` section marker is present and no
    marker appears twice (an instruction or response that quotes one); ``ValueError`` naming the marker."""
    for marker in required:
        if counts[marker] == 0:
            raise ValueError(f"not a Prometheus {kind}-grading prompt: section '{marker}' missing")
    for marker, n in counts.items():
        if n > 1:
            raise ValueError(f"the prompt contains the section marker '{marker}' {n} times (an instruction or "
                             "response quotes it), so it cannot be split into its fields unambiguously")


def parse_prompt(text: str) -> dict[str, Any]:
    """Split a formatted Prometheus prompt back into its fields (the inverse of :func:`render_prompt`).

    Linear in the prompt's length whatever it holds: the section headers are counted first (each must occur
    once, the reference answer's at most once; a field that quotes one makes the split ambiguous) and the text
    is then cut at their positions with ``str.find``. The regex this replaces backtracked on prompts repeating
    the headers (about m^4.5 steps for m repeats: seconds of a server's time for a 10 KB request).

    Raises ``ValueError`` naming the section that is missing, repeated or out of the expected layout.
    """
    counts = section_marker_counts(text)
    check_section_counts(counts, (_TASK, _INSTRUCTION, _RESPONSE, _RUBRICS, _FEEDBACK), "absolute")
    bad = "not a Prometheus absolute-grading prompt: sections are out of the expected layout"
    i_ins, i_resp, i_rub, i_fb = (text.find(m) for m in (_INSTRUCTION, _RESPONSE, _RUBRICS, _FEEDBACK))
    i_ref = text.find(_REFERENCE)
    order = [0, i_ins, i_resp] + ([i_ref] if i_ref >= 0 else []) + [i_rub, i_fb]
    if not text.startswith(_TASK + "\n") or order != sorted(order):
        raise ValueError(bad)

    def body(start: int, head: str, end: int) -> str:
        """The text between ``head`` (at ``start``, then a newline) and the blank line before ``end``."""
        lo, hi = start + len(head) + 1, end - 2
        if text[lo - 1] != "\n" or hi < lo or text[hi:end] != "\n\n":
            raise ValueError(bad)
        return text[lo:hi]

    body(0, _TASK, i_ins)  # the fixed task description: any text, as prometheus-eval's templates vary it
    instruction = body(i_ins, _INSTRUCTION, i_resp)
    response = body(i_resp, _RESPONSE, i_ref if i_ref >= 0 else i_rub)
    reference = None
    if i_ref >= 0:
        head = _REF_HEAD.match(text, i_ref)
        if head is None:
            raise ValueError(bad)
        reference = body(i_ref, head.group(0)[:-1], i_rub)
    rubric = body(i_rub, _RUBRICS, i_fb)
    if text[i_fb + len(_FEEDBACK):] not in ("", " "):
        raise ValueError(bad)
    close = rubric.find("]\nScore ")  # the criteria end at the first "]" that a score line follows
    if not rubric.startswith("[") or close < 0:
        raise ValueError(bad)
    criteria, scores_text = rubric[1:close], rubric[close + 2:]
    starts = list(_SCORE_LINE.finditer(scores_text))
    values = [int(s.group(1)) for s in starts]
    if not starts or starts[0].start() != 0:
        raise ValueError("the score rubric does not continue with a 'Score N: description' line after its "
                         "[criteria]")
    if values != list(range(values[0], values[0] + len(values))):
        raise ValueError(f"rubric score lines are not consecutive: {values}")
    descriptions = []
    for i, s in enumerate(starts):
        end = starts[i + 1].start() - 1 if i + 1 < len(starts) else len(scores_text)
        descriptions.append(scores_text[s.end():end])
    return {
        "instruction": instruction,
        "response": response,
        "reference_answer": reference,
        "criteria": criteria,
        "score_descriptions": descriptions,
        "scale_min": values[0],
        "scale_max": values[-1],
    }


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
