"""The strings and numbers that the data format, the loss and inference must agree on, in one place.

A TRACT judge is trained on ``{CoT} So the overall score is {y}`` and read out at the position that predicts
``{y}``; at inference its CoT is generated until it starts to state the score, then the same phrase is appended
and the score read from the next-token distribution. So the training target (``data.prompts``), the masked
labels (``data.encode``, ``loss``, ``models.cot_raft``), the stop strings (``config``, ``judge``), the CoT
cleanup (``runtime.engine``) and the decode baseline's parser (``judge.parsing``) all depend on the constants
below: change one here and every side changes with it.

Why these values (/work/shared/FIDELITY.md, read from the official TRACT code): the official inference stops
generation at ``[RESULT]`` and cuts the CoT at ``So the overall``; its training target ends with
``So the overall score is {y}``. Pure Python (``re`` only, no torch) so that ``config`` and ``data`` can import it.
"""

from __future__ import annotations

import re

SCORE_PHRASE = "So the overall score is"
"""Precedes the score in every training target; the token after it is the one whose distribution is read."""

RESULT_MARKER = "[RESULT]"
"""Where the Prometheus prompt tells a judge to write its score ("Feedback: ... [RESULT] (an integer ...)"):
models trained on Prometheus data (and GPT-4's feedback) state the score after it, so generation stops there."""

CUT_PHRASE = "So the overall"
"""Where the official code cuts a generated CoT: the start of the score phrase (a prefix of it, so a model that
words the rest differently, "So the overall quality ...", is cut as well)."""

STOP_STRINGS: tuple[str, ...] = (CUT_PHRASE, RESULT_MARKER)
"""``generation.stop``'s default: a CoT ends where the model starts to state its score, either way."""

IGNORE_INDEX = -100
"""Label of a position that is not trained (prompt, padding, the score token in CE): the default
``ignore_index`` of ``torch.nn.CrossEntropyLoss`` and the value Hugging Face collators and models use."""

assert SCORE_PHRASE.startswith(CUT_PHRASE)  # cutting at CUT_PHRASE must remove a whole score phrase

_SCORE_MARKERS = f"{re.escape(SCORE_PHRASE)}|{re.escape(RESULT_MARKER)}"

SCORE_STATEMENT_RE = re.compile(rf"(?:{_SCORE_MARKERS})\s*:?\s*\(?\s*(\d+(?:\.\d+)?)", re.I)
"""The decode baseline's parser: the number after the score phrase or ``[RESULT]`` (group 1); ``: (4`` tolerated."""

DANGLING_SCORE_RE = re.compile(rf"(?:\s*(?:{_SCORE_MARKERS})\s*)+\Z", re.I)
"""Score markers left without a number at the end of a CoT (a stop string can leave ``[RESULT]`` or the phrase
behind); removed so that appending the score phrase does not state it twice."""

TRAILING_SCORE_RE = re.compile(
    rf"(?:\s*(?:{re.escape(RESULT_MARKER)}|{re.escape(SCORE_PHRASE)}|the overall score is|Overall score:|Score:)"
    r"\s*\(?\d+(?:\.\d+)?\)?\s*(?:/\s*\d+)?\s*\.?\s*)+\Z",
    re.I,
)
"""Trailing score statements in source feedback ("... [RESULT] 4", "So the overall score is 4.", "Score: 4/5"):
stripped from training feedback so that the rendered target states the score once, after ``SCORE_PHRASE``."""
