"""Relative (pairwise) grading: the Prometheus relative-grading prompt, its verdict tokens and its training target.

The layout is prometheus-eval's, byte for byte: ``REL_SYSTEM_PROMPT``, ``RELATIVE_PROMPT`` (with a reference
answer) and ``RELATIVE_PROMPT_WO_REF`` in ``libs/prometheus-eval/prometheus_eval/prompts.py`` of
github.com/prometheus-eval/prometheus-eval (``PrometheusEval.relative_grade`` sends the system prompt and the
formatted template as the user turn; its parser, ``parser._parse_output_relative``, reads ``[RESULT] A`` / ``B``
at the end of the answer). The task description is upstream's since its commit 62a85d1 (January 2025, Prometheus
2's wording: "two responses to evaluate (denoted as Response A and Response B) ... [RESULT] (Either "A" or "B")");
the PyPI release 0.1.20 still sends an older description with the same sections, which the parser accepts too
(the description is not parsed). The tests round-trip render -> parse for both.

The regression-aware target is TRACT's, on a two-value scale: the model writes ``{feedback} [RESULT] {A|B}``,
CE trains the feedback, and the verdict position is read out as p(A) = p("A") / (p("A") + p("B")), the RAIL
expectation over the values A = 1, B = 0 with the distribution renormalised over the two verdict tokens (the loss's
``rail_normalize``, the judge's ``normalize``). So the same score-scale and loss machinery trains
CE + λ·(p(A) − y)², y = 1 (A better), 0 (B better) or a soft preference in between.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from tract_dist.data.prompts import check_section_counts
from tract_dist.data.score_scale import ScoreScale, split_at_value
from tract_dist.data.score_tokens import ScoreTokenError
from tract_dist.protocol import RESULT_MARKER

REL_SYSTEM_PROMPT = (
    "You are a fair judge assistant assigned to deliver insightful feedback that compares individual "
    "performances, highlighting how each stands relative to others within the same cohort."
)

_HEADER_REF = (
    "###Task Description:\n"
    "An instruction (might include an Input inside it), two responses to evaluate (denoted as Response A and "
    "Response B), a reference answer, and an evaluation criteria are given.\n"
)
_HEADER_NOREF = (
    "###Task Description:\n"
    "An instruction (might include an Input inside it), two responses to evaluate (denoted as Response A and "
    "Response B), and an evaluation criteria are given.\n"
)
# Prometheus' words verbatim (step 2 mentions the reference answer in both templates, as theirs does).
_STEPS = (
    "1. Write a detailed feedback that assess the quality of the two responses strictly based on the given "
    "evaluation criteria, not evaluating in general.\n"
    "2. Make comparisons between Response A, Response B, and the Reference Answer. Instead of examining Response A "
    "and Response B separately, go straight to the point and mention about the commonalities and differences "
    "between them.\n"
    '3. After writing the feedback, indicate the better response, either "A" or "B".\n'
    '4. The output format should look as follows: "Feedback: (write a feedback for criteria) [RESULT] (Either "A" '
    'or "B")"\n'
    "5. Please do not generate any other opening, closing, and explanations.\n\n"
)
_INSTRUCTION, _RESP_A, _RESP_B, _REFERENCE, _RUBRIC, _FEEDBACK = (
    "###Instruction:", "###Response A:", "###Response B:", "###Reference Answer:", "###Score Rubric:",
    "###Feedback:")
REL_SECTION_MARKERS = ("###Task Description:", _INSTRUCTION, _RESP_A, _RESP_B, _REFERENCE, _RUBRIC, _FEEDBACK)

VERDICTS = ("A", "B")
VERDICT_VALUES = (1, 0)
"""The two-value scale: p(A) = Σ v·q(v) with q renormalised over {A, B}; A first (``ScoreScale.scores``)."""
_VERDICT_CONTEXT = "The responses are compared. " + RESULT_MARKER + " {v}"


@dataclass
class PairExample:
    """One relative-grading example: two responses to one instruction, a rubric (the evaluation criteria, as
    prometheus-eval's ``relative_grade`` takes it) and the preference y = P(A is better): 1, 0, a soft value,
    0.5 for a tie, NaN unlabeled. ``feedback`` is the comparison (the CoT) without its ``[RESULT]``."""

    id: str
    instruction: str
    response_a: str
    response_b: str
    rubric: str
    preference: float
    reference_answer: str | None = None
    feedback: str | None = None
    category: str | None = None
    weight: float | None = None

    def swapped(self) -> "PairExample":
        """The same pair with the responses in the other order (y -> 1 - y). The feedback names A and B, so it
        does not carry over (None)."""
        return replace(self, response_a=self.response_b, response_b=self.response_a,
                       preference=1.0 - self.preference, feedback=None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["weight"] is None:
            del d["weight"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PairExample":
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


def relative_system_prompt(absolute: str | None) -> str | None:
    """The system prompt of relative grading for a config's ``data.system_prompt``: Prometheus' own
    ``REL_SYSTEM_PROMPT`` where the absolute default (``ABS_SYSTEM_PROMPT``) stands, else the configured one
    (None: none, as the official training data has)."""
    from tract_dist.data.prompts import ABS_SYSTEM_PROMPT

    return REL_SYSTEM_PROMPT if absolute == ABS_SYSTEM_PROMPT else absolute


def render_relative_prompt(pair: PairExample) -> str:
    """The user turn of prometheus-eval's RELATIVE_PROMPT (reference answer given) or RELATIVE_PROMPT_WO_REF."""
    has_ref = pair.reference_answer is not None and pair.reference_answer != ""
    text = (_HEADER_REF if has_ref else _HEADER_NOREF) + _STEPS
    text += f"{_INSTRUCTION}\n{pair.instruction}\n\n{_RESP_A}\n{pair.response_a}\n\n{_RESP_B}\n{pair.response_b}\n\n"
    if has_ref:
        text += f"{_REFERENCE}\n{pair.reference_answer}\n\n"
    return text + f"{_RUBRIC}\n{pair.rubric}\n\n{_FEEDBACK} "


def is_relative_prompt(text: str) -> bool:
    """The text carries the relative layout's own sections (two responses), not the absolute one's."""
    return _RESP_A in text and _RESP_B in text and _INSTRUCTION in text


def parse_relative_prompt(text: str) -> dict[str, Any]:
    """Split a relative-grading prompt into its fields (the inverse of :func:`render_relative_prompt`); linear
    in the text (``str.find`` at headers counted first, as ``prompts.parse_prompt``). Raises ``ValueError``
    naming the section that is missing, repeated or out of place."""
    counts = {m: text.count(m) for m in REL_SECTION_MARKERS}
    check_section_counts(counts, (REL_SECTION_MARKERS[0], _INSTRUCTION, _RESP_A, _RESP_B, _RUBRIC, _FEEDBACK),
                         "relative")
    bad = "not a Prometheus relative-grading prompt: sections are out of the expected layout"
    pos = {m: text.find(m) for m in REL_SECTION_MARKERS}
    order = [m for m in REL_SECTION_MARKERS if pos[m] >= 0]
    if pos[REL_SECTION_MARKERS[0]] != 0 or [pos[m] for m in order] != sorted(pos[m] for m in order):
        raise ValueError(bad)

    def body(m: str) -> str:
        nxt = order[order.index(m) + 1]
        lo, hi = pos[m] + len(m) + 1, pos[nxt] - 2
        if text[lo - 1] != "\n" or hi < lo or text[hi:pos[nxt]] != "\n\n":
            raise ValueError(bad)
        return text[lo:hi]

    if text[pos[_FEEDBACK] + len(_FEEDBACK):] not in ("", " "):
        raise ValueError(bad)
    return {"instruction": body(_INSTRUCTION), "response_a": body(_RESP_A), "response_b": body(_RESP_B),
            "reference_answer": body(_REFERENCE) if pos[_REFERENCE] >= 0 else None, "rubric": body(_RUBRIC)}


def verdict_text(preference: float) -> str:
    """The verdict written in a training target: A when y > 0.5, B when y < 0.5; a tie (0.5) writes A. The
    verdict token is not a CE target (its probability is learnt through the regression term), so a tie's letter
    only fills the position that is read out."""
    return "B" if preference < 0.5 else "A"


def render_relative_target(feedback: str, preference: float) -> str:
    """``{feedback} [RESULT] {A|B}`` (EOS appended at tokenisation), the output format the prompt asks for."""
    head = f"{feedback} " if feedback else ""
    return f"{head}{RESULT_MARKER} {verdict_text(preference)}"


_LEADING_FEEDBACK = re.compile(r"\A\s*Feedback:\s*", re.I)
_TRAILING_VERDICT = re.compile(r"\s*\[RESULT\]\s*:?\s*[\(\"']?\s*(?:Response\s+)?[AB]\s*[\)\"']?\s*\.?\s*\Z", re.I)


def normalize_relative_feedback(text: str) -> str:
    """A source feedback without its leading ``Feedback:`` and trailing ``[RESULT] A`` (the target states the
    verdict once). Raises ``ValueError`` when ``[RESULT]`` remains inside it: generation stops there, so a
    target holding it twice would train the model to stop early."""
    out = _TRAILING_VERDICT.sub("", _LEADING_FEEDBACK.sub("", text)).strip()
    if RESULT_MARKER.lower() in out.lower():
        raise ValueError(f"the feedback states '{RESULT_MARKER}' before its end")
    return out


_DECODED_VERDICT = re.compile(r"\[RESULT\]\s*:?\s*[\(\"']?\s*(?:Response\s+)?([AB])\b", re.I)


def parse_decoded_verdict(text: str) -> str | None:
    """The last ``[RESULT] A`` / ``B`` of a generated answer (prometheus-eval's relative parser accepts the
    same core form); None when there is none."""
    found = _DECODED_VERDICT.findall(text)
    return found[-1].upper() if found else None


def derive_verdict_scale(tokenizer: Any) -> ScoreScale:
    """The verdict tokens after ``[RESULT]`` as a two-value :class:`ScoreScale` (A = 1, B = 0), by the rule of
    ``score_tokens``: tokenise the phrase for both letters and keep the differing final token. A tokenizer that
    writes a letter as several tokens there is refused (it could not be read at one position)."""
    encodings = [tokenizer.encode(_VERDICT_CONTEXT.format(v=v), add_special_tokens=False) for v in VERDICTS]
    n = 0
    while n < min(map(len, encodings)) and encodings[0][n] == encodings[1][n]:
        n += 1
    tails = [tuple(e[n:]) for e in encodings]
    for v, tail in zip(VERDICTS, tails):
        if len(tail) != 1 or tokenizer.decode(list(tail)).strip() != v:
            raise ScoreTokenError(f"verdict {v} is not one token after '{RESULT_MARKER}': it tokenises to "
                                  f"{tokenizer.convert_ids_to_tokens(list(tail))}")
    return ScoreScale(scores=list(VERDICT_VALUES), sequences=tails)


def verdict_prompt_ids(tokenizer: Any, feedback: str, scale: ScoreScale) -> list[int]:
    """Ids of ``{feedback} [RESULT]`` ending where the model predicts the verdict (the training target with a
    placeholder verdict, cut: the boundary tokens match training exactly); an empty feedback gives the bare
    ``[RESULT]`` (RAIL without CoT)."""
    return split_at_value(tokenizer, render_relative_target(feedback, 1.0), scale, VERDICT_VALUES[0])


def check_preference(y: Any) -> float:
    """A preference in [0, 1] (NaN: unlabeled) as a float; anything else raises ``ValueError``."""
    if isinstance(y, bool) or not isinstance(y, (int, float)):
        raise ValueError(f"expected a number in [0, 1], got {type(y).__name__}")
    y = float(y)
    if not math.isnan(y) and not 0.0 <= y <= 1.0:
        raise ValueError(f"preference {y!r} is outside [0, 1]")
    return y


PAIR_CUT_ORDER = ("response_b", "response_a", "reference_answer", "instruction")
"""Over-long pairs lose text from the end of response B, then A, then the reference, then the instruction."""


def pair_prompt_ids(tokenizer: Any, pair: PairExample, opts: Any) -> list[int]:
    """The relative prompt through the chat template (``opts``: ``encode.EncodeOptions``; its system prompt is
    the caller's, ``REL_SYSTEM_PROMPT`` for prometheus-eval's layout)."""
    from tract_dist.data.encode import chat_prompt_ids

    return chat_prompt_ids(tokenizer, render_relative_prompt(pair), opts)


def fit_pair_prompt(tokenizer: Any, pair: PairExample, budget: int, opts: Any) -> tuple[list[int], bool]:
    """:func:`pair_prompt_ids` within ``budget`` tokens (``encode.fit_prompt`` with the pair's fields)."""
    from tract_dist.data.encode import fit_prompt

    return fit_prompt(tokenizer, pair, budget, opts, render=lambda p: pair_prompt_ids(tokenizer, p, opts),
                      cut_order=PAIR_CUT_ORDER)


def encode_pair(tokenizer: Any, pair: PairExample, scale: ScoreScale, opts: Any) -> Any:
    """One pair as a training sequence ``prompt + {feedback} [RESULT] + verdict + EOS`` (``encode.Encoded``):
    labels train the feedback and the EOS, the verdict position is the score position and ``score`` is y, so
    collate, the loss (with values A = 1, B = 0 and ``rail_normalize``) and packing treat it like any example."""
    from tract_dist.data.encode import _MIN_FIELD_TOKENS, DroppedExample, Encoded
    from tract_dist.protocol import IGNORE_INDEX

    if math.isnan(pair.preference):
        raise ValueError(f"pair {pair.id} has no preference to train on")
    if opts.use_cot and pair.feedback is None:
        raise ValueError(f"pair {pair.id} has no feedback to train on")
    cot = verdict_prompt_ids(tokenizer, pair.feedback if opts.use_cot else "", scale)
    verdict = scale.sequences[VERDICTS.index(verdict_text(pair.preference))][0]
    eos = tokenizer.eos_token_id
    budget = opts.max_length - len(cot) - 2
    if budget < _MIN_FIELD_TOKENS:
        raise DroppedExample("target_too_long")
    p_ids, truncated = fit_pair_prompt(tokenizer, pair, budget, opts)
    return Encoded(id=pair.id, input_ids=p_ids + cot + [verdict, eos],
                   labels=[IGNORE_INDEX] * len(p_ids) + cot + [IGNORE_INDEX, eos],
                   score_position=len(p_ids) + len(cot) - 1, score_token_id=verdict, score=float(pair.preference),
                   truncated=truncated, weight=pair.weight)
