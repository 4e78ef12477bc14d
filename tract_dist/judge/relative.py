"""``PairJudge``: relative grading (two responses, a verdict) on a :class:`~tract_dist.judge.judge.Judge`'s engine.

- ``cot_rail``: n comparisons (the feedback; greedy when n = 1), then for each one forward pass over
  ``<prompt><feedback> [RESULT]`` and p(A) = p("A") / (p("A") + p("B")) at that position (the RAIL read-out of the
  two-value scale A = 1, B = 0, renormalised: ``data.relative``); the comparisons' p(A) are averaged.
- ``rail``: the prompt followed at once by ``[RESULT]`` (no feedback).
- ``decode``: generate the whole answer and parse its ``[RESULT] A`` / ``B``; p(A) is the share of A verdicts
  among the parseable answers (unparseable ones are counted, never guessed).

``swap=True`` judges every pair a second time with the responses exchanged and keeps that result beside the
first (``PairResult.swapped``): its p(A) is the probability that the *original* B is better, so a judge without
position bias gives p_swapped(A) = 1 − p(A). :func:`debiased` averages the two orders.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tract_dist.data.encode import DroppedExample
from tract_dist.data.relative import (PairExample, check_preference, derive_verdict_scale, fit_pair_prompt,
                                      parse_decoded_verdict, relative_system_prompt, verdict_prompt_ids)
from tract_dist.judge.rail import scale_readouts
from tract_dist.runtime.deadline import StopSignal
from tract_dist.runtime.engine import extract_cot

if TYPE_CHECKING:
    from tract_dist.config import Config

PairMode = Literal["cot_rail", "decode", "rail"]
_SUFFIX_RESERVE = 16  # tokens kept free after the feedback for " [RESULT]"


@dataclass
class PairResult:
    """One relative judgement. ``p_a`` is None only when it could not be produced (``failure`` says why)."""

    p_a: float | None
    verdict: str | None = None  # "A" (p_a > 0.5), "B" (< 0.5) or "tie" (exactly 0.5)
    cots: list[str] = field(default_factory=list)
    per_cot: list[float | None] = field(default_factory=list)  # p(A) per comparison (decode: 1 / 0 / None)
    mass: float | None = None  # mean p("A") + p("B") over the full vocabulary (RAIL modes)
    mode: str = "cot_rail"
    failure: str | None = None
    unparseable: int = 0
    truncated: bool = False
    swapped: "PairResult | None" = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.swapped is None:
            d.pop("swapped")
        return d


def verdict_of(p_a: float | None) -> str | None:
    """A when p(A) > 0.5, B when below, "tie" at exactly 0.5."""
    if p_a is None:
        return None
    return "A" if p_a > 0.5 else "B" if p_a < 0.5 else "tie"


def debiased(result: PairResult) -> float | None:
    """p(A) averaged over both orders, (p_AB + 1 − p_BA) / 2: position bias cancels (None without both)."""
    if result.p_a is None or result.swapped is None or result.swapped.p_a is None:
        return None
    return (result.p_a + 1.0 - result.swapped.p_a) / 2.0


def as_pair(pair_or_fields: PairExample | dict[str, Any], index: int = 0) -> PairExample:
    """Accept a PairExample or a dict of its fields (id and preference optional: an unlabeled input)."""
    if isinstance(pair_or_fields, PairExample):
        return pair_or_fields
    d = dict(pair_or_fields)
    missing = [k for k in ("instruction", "response_a", "response_b", "rubric") if not d.get(k)]
    if missing:
        raise ValueError(f"pair input {index}: missing field(s) {', '.join(missing)}")
    bad = [k for k in ("instruction", "response_a", "response_b", "rubric", "reference_answer")
           if d.get(k) is not None and not isinstance(d[k], str)]
    if bad:
        raise ValueError(f"pair input {index}: field(s) {', '.join(bad)} must be strings")
    d["id"] = str(d.get("id", index))
    d["preference"] = check_preference(math.nan if d.get("preference") is None else d["preference"])
    return PairExample.from_dict(d)


class PairJudge:
    """Relative grading with a judge's engine, tokenizer, sampling and length options.

    ``PairJudge(judge)`` shares the engine with absolute grading (one model serves both) and its system prompt
    (``REL_SYSTEM_PROMPT`` in place of the absolute default: ``relative_system_prompt``); the verdict tokens come
    from the tokenizer (``derive_verdict_scale``), and the read-out is always renormalised over {A, B}."""

    def __init__(self, judge: Any, system_prompt: str | None | Literal["follow"] = "follow"):
        from dataclasses import replace

        if system_prompt == "follow":  # the judge's configured prompt, Prometheus' relative one for the default
            system_prompt = relative_system_prompt(judge.opts.system_prompt)
        self.judge = judge
        self.engine = judge.engine
        self.tokenizer = judge.tokenizer
        self.scale = derive_verdict_scale(self.tokenizer)
        self.opts = replace(judge.opts, system_prompt=system_prompt)
        self._bare = verdict_prompt_ids(self.tokenizer, "", self.scale)

    @property
    def sampling(self) -> Any:
        """The judge's sampling parameters (a server may replace them: its own generation budget)."""
        return self.judge.sampling

    @classmethod
    def from_config(cls, cfg: Config, model_path: str | None = None, device: str | None = None) -> "PairJudge":
        from tract_dist.judge.judge import Judge

        return cls(Judge.from_config(cfg, model_path, device))

    def grade(self, pair: PairExample | dict[str, Any], n_cots: int = 1, mode: PairMode = "cot_rail",
              swap: bool = False) -> PairResult:
        """Judge one pair (a PairExample or a dict of its fields)."""
        return self.grade_batch([pair], n_cots=n_cots, mode=mode, swap=swap)[0]

    def grade_batch(self, pairs: list[PairExample | dict[str, Any]], n_cots: int = 1, mode: PairMode = "cot_rail",
                    swap: bool = False, stops: list[StopSignal | None] | None = None) -> list[PairResult]:
        """Judge many pairs in one batch (both orders in the same batch with ``swap``); one result per pair."""
        if mode not in ("cot_rail", "decode", "rail"):
            raise ValueError(f"mode must be cot_rail, decode or rail, got {mode!r}")
        if not isinstance(n_cots, int) or isinstance(n_cots, bool) or n_cots < 1:
            raise ValueError(f"n_cots must be an integer >= 1 for relative grading, got {n_cots!r}")
        prs = [as_pair(p, i) for i, p in enumerate(pairs)]
        if swap:
            prs = prs + [p.swapped() for p in prs]
            stops = (stops + stops) if stops else None
        results = self._grade(prs, n_cots, mode, stops)
        if not swap:
            return results
        n = len(results) // 2
        for r, s in zip(results[:n], results[n:]):
            r.swapped = s
        return results[:n]

    def _grade(self, prs: list[PairExample], n_cots: int, mode: str,
               stops: list[StopSignal | None] | None) -> list[PairResult]:
        from tract_dist.runtime.deadline import fired

        results = [PairResult(p_a=None, mode=mode) for _ in prs]
        reserve = 0 if mode == "rail" else self.sampling.max_new_tokens + _SUFFIX_RESERVE
        budget = max(self.opts.max_length - reserve, 64)
        prompts: dict[int, list[int]] = {}
        for i, p in enumerate(prs):
            why = fired(stops, i) if stops else None
            if why:
                results[i].failure = f"{why}: stopped before the prompt was built"
                continue
            try:
                prompts[i], results[i].truncated = fit_pair_prompt(self.tokenizer, p, budget, self.opts)
            except DroppedExample as e:
                results[i].failure = f"dropped: {e}"
        if mode == "rail":
            self._read(results, {i: [(None, ids + self._bare)] for i, ids in prompts.items()})
            return results
        jobs = [(i, j) for i in prompts for j in range(n_cots)]
        params = self.judge._params(n_cots, decode=mode == "decode")
        gens = self.judge._generate([(prs[i].id, j, prompts[i]) for i, j in jobs], params,
                                    [stops[i] for i, _ in jobs] if stops else None)
        for i in list(prompts):
            why = fired(stops, i) if stops else None
            if why:
                del prompts[i]
                results[i].failure = f"{why}: stopped during generation"
        if mode == "decode":
            for (i, _), g in zip(jobs, gens):
                if i in prompts:
                    results[i].cots.append(g.text)
            for i in prompts:
                r = results[i]
                verdicts = [parse_decoded_verdict(t) for t in r.cots]
                r.per_cot = [None if v is None else float(v == "A") for v in verdicts]
                r.unparseable = sum(v is None for v in verdicts)
                good = [x for x in r.per_cot if x is not None]
                r.p_a = sum(good) / len(good) if good else None
                r.verdict = verdict_of(r.p_a)
                r.failure = None if good else "unparseable: no '[RESULT] A' or 'B' in the answer"
            return results
        seqs: dict[int, list[tuple[str, list[int]]]] = {}
        for (i, _), g in zip(jobs, gens):
            if i in prompts:
                cot = extract_cot(g.text, self.sampling.stop)
                tail = verdict_prompt_ids(self.tokenizer, cot, self.scale) if cot else self._bare
                seqs.setdefault(i, []).append((cot, prompts[i] + tail))
        self._read(results, seqs)
        return results

    def _read(self, results: list[PairResult], seqs: dict[int, list[tuple[str | None, list[int]]]]) -> None:
        """p(A) renormalised over {A, B} at each sequence's last position, averaged per pair."""
        flat = [(i, c, s) for i, items in seqs.items() for c, s in items]
        reads = scale_readouts(self.engine, [s for _, _, s in flat], self.scale, normalize=True)
        for (i, cot, _), rd in zip(flat, reads):
            r = results[i]
            if cot is not None:
                r.cots.append(cot)
            r.per_cot.append(rd.score)
            r.mass = rd.mass if r.mass is None else r.mass + rd.mass
        for i in seqs:
            r = results[i]
            r.p_a = sum(r.per_cot) / len(r.per_cot)  # type: ignore[arg-type]
            r.mass = r.mass / len(r.per_cot) if r.mass is not None else None
            r.verdict = verdict_of(r.p_a)
