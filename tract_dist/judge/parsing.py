"""The decode baseline's parser: the number a model wrote after the score phrase or ``[RESULT]``."""

from __future__ import annotations

from tract_dist.protocol import SCORE_STATEMENT_RE


def parse_decoded_score(text: str, scale: tuple[int, int] = (1, 5)) -> tuple[float | None, str | None]:
    """(score, None) for the first score statement inside the scale, else (None, reason).

    Reasons: ``no_score_statement`` (neither phrase followed by a number) and ``out_of_scale``.
    """
    matches = list(SCORE_STATEMENT_RE.finditer(text))
    if not matches:
        return None, "no_score_statement"
    lo, hi = scale
    for m in matches:
        value = float(m.group(1))
        if lo <= value <= hi:
            return value, None
    return None, "out_of_scale"
