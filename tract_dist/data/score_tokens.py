"""Score-token ids derived from the tokenizer, never hard-coded.

A score value must be exactly one token in the context where the model predicts it ("... score is {k}").
Tokenizers disagree on where the space goes: SentencePiece (Mistral) and Llama-3's tiktoken emit a bare
space token and then the digit, byte-level BPE may fuse the space into the digit ("Ġ4"). We therefore
tokenise the whole phrase for every value and require that all values share one token prefix and differ in
exactly one final token: that final token is the score token, and the shared prefix is what the model
reads before predicting it. The same rule builds training targets and inference prompts, so both see the
same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tract_dist.errors import TractError
from tract_dist.protocol import SCORE_PHRASE

_CONTEXT = "The response is clear. " + SCORE_PHRASE + " {k}"


class ScoreTokenError(TractError, ValueError):
    """A score value is not a single token in the scoring context."""


class ScaleError(TractError, ValueError):
    """A scale that is not ``MIN-MAX`` with 0 <= MIN < MAX and at most MAX_SCALE_VALUES values."""


# 0-100 is the widest scale in use; multi-token values (``score_scale``) read one trie node per shared prefix.
MAX_SCALE_VALUES = 101


@dataclass(frozen=True)
class ScoreTokens:
    scores: list[int]
    token_ids: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {"scores": list(self.scores), "token_ids": list(self.token_ids)}

    def id_for(self, score: int) -> int:
        return self.token_ids[self.scores.index(score)]


def parse_scale(scale: str | tuple[int, int]) -> tuple[int, int]:
    """``"1-5"`` -> (1, 5). Accepts a (min, max) tuple as well."""
    if isinstance(scale, tuple):
        lo, hi = scale
    else:
        try:
            lo_s, hi_s = str(scale).split("-")
            if not (lo_s.strip().isdigit() and hi_s.strip().isdigit()):
                raise ValueError
            lo, hi = int(lo_s), int(hi_s)
        except ValueError:
            raise ScaleError(f"scale must look like MIN-MAX, e.g. '1-5', got {scale!r}") from None
    if isinstance(lo, bool) or isinstance(hi, bool) or not (isinstance(lo, int) and isinstance(hi, int)):
        raise ScaleError(f"scale bounds must be integers, got {scale!r}")
    if lo < 0 or hi <= lo:
        raise ScaleError(f"scale must satisfy 0 <= MIN < MAX, got {lo}-{hi}")
    if hi - lo + 1 > MAX_SCALE_VALUES:
        raise ScaleError(f"scale {lo}-{hi} has {hi - lo + 1} values; at most {MAX_SCALE_VALUES}")
    return lo, hi


def derive_score_tokens(tokenizer: Any, scale: str | tuple[int, int] = (1, 5)) -> ScoreTokens:
    """Return the id of each score value's token, in score order; raise if a value is not one token."""
    lo, hi = parse_scale(scale)
    scores = list(range(lo, hi + 1))
    encodings = [tokenizer.encode(_CONTEXT.format(k=k), add_special_tokens=False) for k in scores]
    prefix = encodings[0]
    for enc in encodings[1:]:
        n = 0
        while n < min(len(prefix), len(enc)) and prefix[n] == enc[n]:
            n += 1
        prefix = prefix[:n]
    ids = []
    for k, enc in zip(scores, encodings):
        tail = enc[len(prefix):]
        if len(tail) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tail) if tail else []
            raise ScoreTokenError(
                f"score {k} is not a single token after '{SCORE_PHRASE}': it tokenises to {pieces} "
                f"(ids {tail}); choose a scale whose values are single tokens for this tokenizer"
            )
        ids.append(tail[0])
    if len(set(ids)) != len(ids):
        raise ScoreTokenError(f"score values share token ids {ids}; the scale cannot be read from one position")
    for k, t in zip(scores, ids):
        if tokenizer.decode([t]).strip() != str(k):
            raise ScoreTokenError(f"token {t} for score {k} decodes to {tokenizer.decode([t])!r}")
    return ScoreTokens(scores=scores, token_ids=ids)


def split_at_score(tokenizer: Any, text_with_score: str, score_tokens: ScoreTokens, score: int) -> list[int]:
    """Tokenise ``"... So the overall score is {score}"`` and return the ids before the score token.

    Raises if the text does not end with exactly the score token, which would mean the tokenizer merged the
    score with its context and the score position could not be found by construction.
    """
    ids = tokenizer.encode(text_with_score, add_special_tokens=False)
    want = score_tokens.id_for(score)
    if not ids or ids[-1] != want:
        raise ScoreTokenError(
            f"text does not end with the score token {want} for score {score} (last ids {ids[-3:]})"
        )
    return ids[:-1]


def score_prompt_ids(tokenizer: Any, text_before_score: str, score_tokens: ScoreTokens) -> list[int]:
    """Ids of ``text_before_score`` + the score phrase, ending where the model predicts the score token.

    Built by tokenising the training target with a placeholder score and removing it, so the boundary tokens
    (a bare space for SentencePiece and tiktoken) match training exactly. An empty ``text_before_score`` gives
    the score-only (no-CoT) form.
    """
    from tract_dist.data.prompts import render_target

    k = score_tokens.scores[0]
    return split_at_score(tokenizer, render_target(text_before_score, k, k, k), score_tokens, k)
