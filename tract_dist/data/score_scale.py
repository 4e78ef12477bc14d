"""Score scales whose values may be several tokens ("10" is "1", "0" for Mistral and SmolLM2), as a trie.

The RAIL read-out of a scale is ŷ = Σ_v v·p(v), p(v) the probability that the model writes exactly v after
"… score is": the product of the conditional probabilities of v's tokens. Values share tokens ("1" and "10"
start alike), so the conditionals are read at the nodes of the values' prefix trie: the root is the position
that predicts the first score token (today's score position), and every proper prefix of a value's tokens is
an internal node whose next-token distribution must be known as well. Each node is computed once however many
values pass through it (Mistral 1-10: the root and the node "1"; 0-100: the root, "1".."9" and "10").

A value whose tokens are a proper prefix of another value's ("1" of "10") ends with the token that follows the
score in training (the tokenizer's EOS, ``data.encode``): p(1) = p("1")·p(EOS | "1"), so that p(1) + p(10) never
counts the mass of "10" twice and Σ_v p(v) <= 1 as for single-token scales. A scale whose values are all one
token (no value a prefix of another) has one node, the root, and gives exactly the single-token read-out.

Everything comes from the tokenizer (the same rule as ``score_tokens``): nothing is hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tract_dist.data.score_tokens import _CONTEXT, ScoreTokenError, ScoreTokens, parse_scale
from tract_dist.protocol import SCORE_PHRASE


@dataclass(frozen=True)
class ScoreTrie:
    """The prefix trie of a scale's token sequences (pure Python; the loss builds its tensors from it).

    ``nodes[n]`` is the token path from the root to node n (``nodes[0] == ()``, the root; then by depth);
    ``edge_ids`` the distinct tokens read at any node (the score-token union, K_u); ``paths[v]`` the (node,
    edge) pairs of value v's tokens, edge an index into ``edge_ids``."""

    nodes: tuple[tuple[int, ...], ...]
    edge_ids: tuple[int, ...]
    paths: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    def incidence(self) -> list[list[float]]:
        """(K_values, N·K_u) 0/1 matrix: 1 where value v's path uses edge (n, j) (flattened as n·K_u + j);
        log p(v) = E_v · log p(node, edge) and ∂ŷ/∂(node, edge) sums over the same matrix."""
        k_u = len(self.edge_ids)
        rows = []
        for path in self.paths:
            row = [0.0] * (self.num_nodes * k_u)
            for n, j in path:
                row[n * k_u + j] = 1.0
            rows.append(row)
        return rows


def build_trie(sequences: list[tuple[int, ...]]) -> ScoreTrie:
    """The trie of prefix-free token sequences (none a proper prefix of another, all distinct)."""
    prefixes = {seq[:i] for seq in sequences for i in range(len(seq))}
    nodes = tuple(sorted(prefixes, key=lambda p: (len(p), p)))
    node_of = {p: i for i, p in enumerate(nodes)}
    edge_ids = tuple(sorted({t for seq in sequences for t in seq}))
    edge_of = {t: j for j, t in enumerate(edge_ids)}
    paths = tuple(tuple((node_of[seq[:i]], edge_of[seq[i]]) for i in range(len(seq))) for seq in sequences)
    return ScoreTrie(nodes=nodes, edge_ids=edge_ids, paths=paths)


@dataclass(frozen=True)
class ScoreScale:
    """Each score value's tokens after the shared prefix (``… score is``), the terminator where needed.

    ``sequences[i]`` are the tokens of ``scores[i]``; ``terminator`` (the EOS id) ends the values that are a
    proper prefix of another value and is None when no value needs it."""

    scores: list[int]
    sequences: list[tuple[int, ...]]
    terminator: int | None = None
    trie: ScoreTrie = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "trie", build_trie(self.sequences))

    @property
    def single_token(self) -> bool:
        """Every value is one token: one read-out position, exactly today's ŷ = Σ_k v_k p(token_k)."""
        return all(len(s) == 1 for s in self.sequences)

    def score_tokens(self) -> ScoreTokens:
        """The single-token view (raises for a multi-token scale)."""
        if not self.single_token:
            raise ScoreTokenError("a multi-token scale has no single score token per value")
        return ScoreTokens(scores=list(self.scores), token_ids=[s[0] for s in self.sequences])

    def value_tokens(self, score: int) -> tuple[int, ...]:
        """The tokens that state ``score`` after the score phrase (terminator included where needed)."""
        return self.sequences[self.scores.index(score)]

    def as_dict(self) -> dict[str, Any]:
        return {"scores": list(self.scores), "sequences": [list(s) for s in self.sequences],
                "terminator": self.terminator, "nodes": [list(n) for n in self.trie.nodes]}


def _value_start(tokenizer: Any, encodings: list[list[int]], scores: list[int]) -> int:
    """Length of the shared prefix before the values: the common prefix of all encodings, shortened until every
    tail decodes to its value (a scale such as 10-19 shares its first digit, which belongs to the value)."""
    n = 0
    first = encodings[0]
    while all(len(e) > n and e[n] == first[n] for e in encodings):
        n += 1
    while n > 0 and any(tokenizer.decode(e[n:]).strip() != str(k) for e, k in zip(encodings, scores)):
        n -= 1
    return n


def derive_score_scale(tokenizer: Any, scale: str | tuple[int, int] = (1, 5)) -> ScoreScale:
    """Every value's tokens after ``… score is`` from the tokenizer; a value that is a proper prefix of another
    gets the tokenizer's EOS (what training appends after the score) as its last token."""
    lo, hi = parse_scale(scale)
    scores = list(range(lo, hi + 1))
    encodings = [tokenizer.encode(_CONTEXT.format(k=k), add_special_tokens=False) for k in scores]
    start = _value_start(tokenizer, encodings, scores)
    tails = [tuple(e[start:]) for e in encodings]
    for k, tail in zip(scores, tails):
        if not tail or tokenizer.decode(list(tail)).strip() != str(k):
            raise ScoreTokenError(f"score {k} cannot be separated from '{SCORE_PHRASE}': its tokens "
                                  f"{tokenizer.convert_ids_to_tokens(list(tail))} do not decode to {k}")
    if len(set(tails)) != len(tails):
        raise ScoreTokenError(f"two score values tokenise alike after '{SCORE_PHRASE}'")
    needs_end = [any(len(o) > len(t) and o[:len(t)] == t for o in tails) for t in tails]
    terminator = None
    if any(needs_end):
        terminator = tokenizer.eos_token_id
        if terminator is None:
            raise ScoreTokenError("a score value is a prefix of another (e.g. 1 of 10) and the tokenizer has no EOS "
                                  "token to end it")
        if any(terminator in t for t in tails):
            raise ScoreTokenError(f"the EOS token {terminator} occurs inside a score value's tokens")
    seqs = [t + (terminator,) if end else t for t, end in zip(tails, needs_end)]
    return ScoreScale(scores=scores, sequences=seqs, terminator=terminator)


def value_text_tokens(scale: ScoreScale, score: int) -> tuple[int, ...]:
    """The tokens that write ``score`` in text (its sequence without the terminator, which is the EOS)."""
    seq = scale.value_tokens(score)
    return seq[:-1] if scale.terminator is not None and seq[-1] == scale.terminator else seq


def split_at_value(tokenizer: Any, text_with_score: str, scale: ScoreScale, score: int) -> list[int]:
    """Tokenise ``"... So the overall score is {score}"`` and return the ids before the value's tokens (the
    multi-token form of ``score_tokens.split_at_score``; the same ids for a single-token scale)."""
    ids = tokenizer.encode(text_with_score, add_special_tokens=False)
    want = list(value_text_tokens(scale, score))
    if len(ids) <= len(want) or ids[-len(want):] != want:
        raise ScoreTokenError(f"text does not end with the tokens {want} of score {score} (last ids {ids[-4:]})")
    return ids[:-len(want)]


def scale_prompt_ids(tokenizer: Any, text_before_score: str, scale: ScoreScale) -> list[int]:
    """Ids of ``text_before_score`` + the score phrase, ending where the model predicts the first score token
    (``score_tokens.score_prompt_ids`` for any scale: the training target with a placeholder value, cut)."""
    from tract_dist.data.prompts import render_target

    k = scale.scores[0]
    return split_at_value(tokenizer, render_target(text_before_score, k, k, k), scale, k)
