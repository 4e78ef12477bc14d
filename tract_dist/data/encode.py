"""Tokenisation of judge examples: chat-templated prompt, masked labels, and the score position by construction.

A training sequence is ``prompt_ids + cot_ids + [score_id] + [eos]`` where ``cot_ids`` are the tokens of
``"{feedback} So the overall score is"`` up to (not including) the score token. Because the pieces are
concatenated here, the index of the score token is known exactly; nothing is inferred from the sequence's
end. Labels are ``IGNORE_INDEX`` (-100) on the prompt and on the score token (TRACT's CE covers CoT tokens
and EOS; the score is learnt through the regression term), and equal the input ids elsewhere (Hugging Face
alignment: the model shifts them).

Over-long examples are never cut in the target: the response text inside the prompt (then the reference
answer, then the instruction) is shortened until the sequence fits, or the example is dropped; both are
counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from tract_dist.data.prompts import ABS_SYSTEM_PROMPT, render_prompt, render_target, score_text
from tract_dist.data.schema import JudgeExample
from tract_dist.data.score_scale import ScoreScale, split_at_value, value_text_tokens
from tract_dist.data.score_tokens import ScoreTokens, split_at_score
from tract_dist.protocol import IGNORE_INDEX  # re-exported: train.data reads it from here
_MIN_FIELD_TOKENS = 16  # a truncated response/instruction keeps at least this many tokens


@dataclass
class EncodeOptions:
    max_length: int = 3000
    truncation: Literal["truncate", "drop"] = "truncate"
    system_prompt: str | None = ABS_SYSTEM_PROMPT
    scale: tuple[int, int] = (1, 5)
    use_cot: bool = True  # False: score-only targets (RAFT without CoT)
    enable_thinking: bool = False  # the template's thinking switch (Qwen3: off closes an empty <think> block)


@dataclass
class Encoded:
    """One tokenised example. ``score_position`` is the row whose next-token logits predict the score."""

    id: str
    input_ids: list[int]
    labels: list[int]
    score_position: int
    score_token_id: int
    score: float
    truncated: bool = False
    weight: float | None = None  # the example's training weight (None: unweighted)
    # Multi-token scales: one token per internal trie node appended after the EOS (positions in input_ids, in
    # ``ScoreTrie.nodes`` order 1..N-1) and each one's parent among them (-1: the score position); collate gives
    # them the positions and the tree attention mask that make their rows predict the node's next token.
    branch_positions: list[int] | None = None
    branch_parents: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        if self.branch_positions is None:  # single-token data sets keep their columns
            d.pop("branch_positions")
            d.pop("branch_parents")
        return d


@dataclass
class EncodeStats:
    examples: int = 0
    encoded: int = 0
    truncated: int = 0
    dropped: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class DroppedExample(Exception):
    """The example cannot fit ``max_length`` without cutting the target."""


def chat_messages(user_text: str, system_prompt: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": user_text}]


def prompt_ids(tokenizer: Any, ex: JudgeExample, opts: EncodeOptions) -> list[int]:
    """The Prometheus prompt rendered through the model's chat template, ending at the assistant turn."""
    return chat_prompt_ids(tokenizer, render_prompt(ex, *opts.scale), opts)


def chat_prompt_ids(tokenizer: Any, user: str, opts: EncodeOptions) -> list[int]:
    """A user turn (any Prometheus layout: absolute or relative) through the chat template, ending at the
    assistant turn; without a template the system text, then the prompt, with the tokenizer's own specials."""
    if getattr(tokenizer, "chat_template", None):
        # enable_thinking reaches templates that have the switch (Qwen3); the others ignore the extra variable.
        text = tokenizer.apply_chat_template(chat_messages(user, opts.system_prompt), tokenize=False,
                                             add_generation_prompt=True, enable_thinking=opts.enable_thinking)
        return tokenizer.encode(text, add_special_tokens=False)
    # No template (a base model): system text, then the prompt, with the tokenizer's own specials.
    text = f"{opts.system_prompt}\n\n{user}" if opts.system_prompt else user
    return tokenizer.encode(text, add_special_tokens=True)


def target_ids(tokenizer: Any, feedback: str, score: float, st: ScoreTokens,
               scale: tuple[int, int]) -> tuple[list[int], int]:
    """(ids of the CoT up to the score position, score token id) for ``{feedback} So the overall score is {k}``
    (or ``So the overall score is {k}`` for an empty feedback)."""
    k = int(score_text(score, *scale))
    cot = split_at_score(tokenizer, render_target(feedback, score, *scale), st, k)
    return cot, st.id_for(k)


def _shorten(tokenizer: Any, text: str, remove: int) -> str | None:
    """``text`` with up to ``remove`` tokens cut from its end, keeping at least _MIN_FIELD_TOKENS; None if
    nothing can be cut."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    keep = max(len(ids) - remove, _MIN_FIELD_TOKENS)
    if keep >= len(ids):
        return None
    return tokenizer.decode(ids[:keep]).rstrip()


_ABSOLUTE_CUT_ORDER = ("response", "reference_answer", "instruction")


def fit_prompt(tokenizer: Any, ex: Any, budget: int, opts: EncodeOptions, *,
               render: Callable[[Any], list[int]] | None = None,
               cut_order: tuple[str, ...] = _ABSOLUTE_CUT_ORDER) -> tuple[list[int], bool]:
    """Prompt ids within ``budget`` tokens, shortening the fields of ``cut_order`` in turn (the response, then
    the reference answer, then the instruction); raises DroppedExample. ``ex`` is a dataclass with those
    fields (a JudgeExample; ``render`` gives the ids of another layout, e.g. a relative-grading pair's)."""
    render = render or (lambda e: prompt_ids(tokenizer, e, opts))
    ids = render(ex)
    if len(ids) <= budget:
        return ids, False
    if opts.truncation == "drop":
        raise DroppedExample("too_long")
    for fld in cut_order:
        if not getattr(ex, fld):
            continue
        for _ in range(4):  # re-tokenising the shortened text can shift a few tokens; retry with the new excess
            excess = len(ids) - budget
            shorter = _shorten(tokenizer, getattr(ex, fld), excess + 2)
            if shorter is None:
                break
            ex = dataclasses.replace(ex, **{fld: shorter})
            ids = render(ex)
            if len(ids) <= budget:
                return ids, True
    raise DroppedExample("prompt_cannot_fit")


def _encode_multi(tokenizer: Any, ex: JudgeExample, scale: ScoreScale, opts: EncodeOptions) -> Encoded:
    """A multi-token scale's sequence: prompt + CoT + the gold value's tokens + EOS, then the internal trie nodes'
    last tokens. Labels: the CoT and EOS (as for one-token values); the value's tokens and the node tokens are
    -100 (the value is learnt through the regression term, as the single score token is)."""
    k = int(score_text(ex.score, *opts.scale))
    cot = split_at_value(tokenizer, render_target(ex.feedback if opts.use_cot else "", ex.score, *opts.scale),
                         scale, k)
    value = list(value_text_tokens(scale, k))
    nodes = scale.trie.nodes[1:]
    node_of = {n: i for i, n in enumerate(nodes)}
    eos = tokenizer.eos_token_id
    budget = opts.max_length - len(cot) - len(value) - 1 - len(nodes)
    if budget < _MIN_FIELD_TOKENS:
        raise DroppedExample("target_too_long")
    p_ids, truncated = fit_prompt(tokenizer, ex, budget, opts)
    start = len(p_ids) + len(cot) + len(value) + 1
    input_ids = p_ids + cot + value + [eos] + [n[-1] for n in nodes]
    labels = [IGNORE_INDEX] * len(p_ids) + cot + [IGNORE_INDEX] * len(value) + [eos] + [IGNORE_INDEX] * len(nodes)
    return Encoded(id=ex.id, input_ids=input_ids, labels=labels, score_position=len(p_ids) + len(cot) - 1,
                   score_token_id=value[0], score=float(ex.score), truncated=truncated, weight=ex.weight,
                   branch_positions=[start + i for i in range(len(nodes))],
                   branch_parents=[node_of.get(n[:-1], -1) for n in nodes])


def encode_example(tokenizer: Any, ex: JudgeExample, st: ScoreTokens | ScoreScale, opts: EncodeOptions) -> Encoded:
    """Tokenise one example with feedback into input ids, labels and the score position (``st``: the score
    tokens, or a :class:`ScoreScale`, whose multi-token values add the trie's node tokens)."""
    if opts.use_cot and ex.feedback is None:
        raise ValueError(f"example {ex.id} has no feedback to train on")
    if isinstance(st, ScoreScale):
        if not st.single_token:
            return _encode_multi(tokenizer, ex, st, opts)
        st = st.score_tokens()
    cot, score_id = target_ids(tokenizer, ex.feedback if opts.use_cot else "", ex.score, st, opts.scale)
    eos = tokenizer.eos_token_id
    budget = opts.max_length - len(cot) - 2
    if budget < _MIN_FIELD_TOKENS:
        raise DroppedExample("target_too_long")
    p_ids, truncated = fit_prompt(tokenizer, ex, budget, opts)
    input_ids = p_ids + cot + [score_id, eos]
    labels = [IGNORE_INDEX] * len(p_ids) + cot + [IGNORE_INDEX, eos]
    return Encoded(id=ex.id, input_ids=input_ids, labels=labels, score_position=len(p_ids) + len(cot) - 1,
                   score_token_id=score_id, score=float(ex.score), truncated=truncated, weight=ex.weight)


def encode_examples(tokenizer: Any, examples: list[Any], st: ScoreTokens | ScoreScale, opts: EncodeOptions,
                    encode: Callable[..., Encoded] | None = None) -> tuple[list[Encoded], EncodeStats]:
    """Encode many examples; dropped ones are counted by reason, truncated ones are counted and flagged.
    ``encode(tokenizer, example, st, opts)``: :func:`encode_example` by default (relative grading passes its
    pair encoder, ``data.relative.encode_pair``)."""
    encode = encode or encode_example
    stats = EncodeStats(examples=len(examples))
    out = []
    for ex in examples:
        try:
            enc = encode(tokenizer, ex, st, opts)
        except DroppedExample as e:
            stats.dropped += 1
            stats.drop_reasons[str(e)] = stats.drop_reasons.get(str(e), 0) + 1
            continue
        stats.truncated += enc.truncated
        out.append(enc)
    stats.encoded = len(out)
    return out, stats
