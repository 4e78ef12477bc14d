"""Readers of relative-grading (pairwise) data into :class:`~tract_dist.data.relative.PairExample`.

- ``preference-collection``: the Preference Collection's schema (prometheus-eval/Preference-Collection, as the
  official TRACT code and Prometheus 2 train on it): ``orig_instruction``, ``orig_response_A``,
  ``orig_response_B``, ``orig_reference_answer``, ``orig_criteria``, ``orig_preference`` ("A" / "B") and the
  comparison in ``output`` (``Feedback: ... [RESULT] A``).
- ``prometheus-eval-pairwise``: prometheus-eval's pairwise benchmark files (``hhh_alignment_eval.json``,
  ``mt_bench_human_judgement_eval.json``, ``alpaca_eval.json``, ``preference_collection_ood_test.json``): two
  absolute-grading prompts per record, ``chosen_instruction`` and ``rejected_instruction``, identical but for
  the response, optional ``tie`` (1: a tie) and ``source`` (the category). As prometheus-eval's relative mode
  does (``eval/run_evaluate.py``, ``score_rubric.split("\\n")[0]``), the rubric is the criteria line
  ``[criteria]``. Its loader places the chosen response at random; here record i puts it at A when i is even
  and at B when odd: balanced, reproducible, and the position-swap check judges both orders anyway.
- ``pairs-jsonl``: the project's normalised pairs (``PairExample`` fields; ``preference`` a number in [0, 1]
  or "A" / "B").

Errors follow ``formats``: a bad record raises :class:`DataError` naming file, record and field (exit 2), or is
skipped and counted with ``skip_invalid``. :func:`pairs_from_absolute` builds pairs from an absolute-grading
set with several responses per instruction (the Vicuna Bench) by gold-score difference, for when no pairwise
file is at hand.
"""

from __future__ import annotations

import math
from itertools import combinations, islice
from pathlib import Path
from typing import Any, Callable

from tract_dist.data.formats import (InvalidRecord, _category, _feedback, _id, _RecordError, _str, _weight,
                                     convert_records, load_records, read_examples)
from tract_dist.data.prompts import parse_prompt
from tract_dist.data.relative import PairExample, check_preference, normalize_relative_feedback
from tract_dist.data.schema import DataError, JudgeExample

PAIR_FORMATS = ("preference-collection", "prometheus-eval-pairwise", "pairs-jsonl")
VICUNA_MIN_GAP = 1.0
"""The least gold-score difference that makes two Vicuna responses a pair (the ``vicuna-pairs`` benchmark): one
point of GPT-4's 1-5 mean scores, a clear preference rather than grading noise."""


def _verdict(rec: dict[str, Any], key: str) -> float:
    v = rec.get(key)
    if v is None:
        raise _RecordError(key, "missing")
    if not isinstance(v, str) or v.strip().upper() not in ("A", "B"):
        raise _RecordError(key, f"expected 'A' or 'B', got {v!r}")
    return 1.0 if v.strip().upper() == "A" else 0.0


def _rel_feedback(rec: dict[str, Any], key: str, required: bool) -> str | None:
    text = _str(rec, key, required=required)
    if text is None:
        return None
    try:
        fb = normalize_relative_feedback(text)
    except ValueError as e:
        raise _RecordError(key, str(e)) from None
    if not fb:
        if required:
            raise _RecordError(key, "empty feedback (nothing left once the verdict is removed)")
        return None
    return fb


def _from_preference_collection(rec: dict[str, Any], i: int, need_fb: bool) -> PairExample:
    return PairExample(
        id=_id(rec, i), instruction=_str(rec, "orig_instruction"),
        response_a=_str(rec, "orig_response_A"), response_b=_str(rec, "orig_response_B"),
        rubric=_str(rec, "orig_criteria"), preference=_verdict(rec, "orig_preference"),
        reference_answer=_str(rec, "orig_reference_answer", required=False) or None,
        feedback=_rel_feedback(rec, "output", need_fb), category=_category(rec),
    )


def _parsed(rec: dict[str, Any], key: str) -> dict[str, Any]:
    try:
        return parse_prompt(_str(rec, key))
    except ValueError as e:
        raise _RecordError(key, str(e)) from None


def _from_pairwise_benchmark(rec: dict[str, Any], i: int, need_fb: bool) -> PairExample:
    chosen, rejected = _parsed(rec, "chosen_instruction"), _parsed(rec, "rejected_instruction")
    for k in ("instruction", "reference_answer", "criteria", "score_descriptions"):
        if chosen[k] != rejected[k]:
            raise _RecordError("rejected_instruction", f"its {k} differs from chosen_instruction's (a pair "
                                                       "compares two responses to one prompt)")
    tie = rec.get("tie", 0)
    if isinstance(tie, bool) or tie not in (0, 1):
        raise _RecordError("tie", f"expected 0 or 1, got {tie!r}")
    source = rec.get("source")
    if source is not None and not isinstance(source, str):
        raise _RecordError("source", f"expected a string, got {type(source).__name__}")
    a_first = i % 2 == 0
    a, b = (chosen, rejected) if a_first else (rejected, chosen)
    return PairExample(
        id=_id(rec, i), instruction=chosen["instruction"], response_a=a["response"], response_b=b["response"],
        rubric=f"[{chosen['criteria']}]", preference=0.5 if tie == 1 else (1.0 if a_first else 0.0),
        reference_answer=chosen["reference_answer"], category=source or _category(rec),
    )


def _from_pairs_jsonl(rec: dict[str, Any], i: int, need_fb: bool) -> PairExample:
    y = rec.get("preference")
    if isinstance(y, str):
        y = _verdict(rec, "preference")
    elif y is None:
        raise _RecordError("preference", "missing")
    else:
        try:
            y = check_preference(y)
        except ValueError as e:
            raise _RecordError("preference", str(e)) from None
        if math.isnan(y):
            raise _RecordError("preference", "NaN (leave unlabeled inputs to the judge's input reader)")
    return PairExample(
        id=_id(rec, i), instruction=_str(rec, "instruction"), response_a=_str(rec, "response_a"),
        response_b=_str(rec, "response_b"), rubric=_str(rec, "rubric"), preference=y,
        reference_answer=_str(rec, "reference_answer", required=False) or None,
        feedback=_rel_feedback(rec, "feedback", need_fb), category=_category(rec), weight=_weight(rec.get("weight")),
    )


_CONVERTERS: dict[str, Callable[[dict[str, Any], int, bool], PairExample]] = {
    "preference-collection": _from_preference_collection,
    "prometheus-eval-pairwise": _from_pairwise_benchmark,
    "pairs-jsonl": _from_pairs_jsonl,
}


def read_pairs(source: str, fmt: str, *, skip_invalid: bool = False, require_feedback: bool = True,
               limit: int | None = None, split: str = "train") -> tuple[list[PairExample], list[InvalidRecord]]:
    """The valid pairs of ``source`` in format ``fmt`` and an account of the invalid ones (raised as a
    :class:`DataError` naming file, record and field unless ``skip_invalid``)."""
    if fmt not in _CONVERTERS:
        raise DataError(source, f"unknown pairwise format {fmt!r}; choose one of {', '.join(PAIR_FORMATS)}")
    convert = _CONVERTERS[fmt]
    records = enumerate(load_records(source, split))
    if limit is not None:
        records = islice(records, limit)
    return convert_records(source, records, lambda rec, i: convert(rec, i, require_feedback), skip_invalid)


def pairs_from_absolute(examples: list[JudgeExample], *, min_gap: float = 1.0) -> list[PairExample]:
    """Pairs of responses to the same instruction and rubric whose gold scores differ by at least ``min_gap``:
    y = 1 when A's gold score is higher. Positions alternate (the k-th pair puts the better response at A when k
    is even), so a judge that always answers A scores 50 %. Used to evaluate relative grading on the Vicuna Bench
    (four responses per question, GPT-4 mean scores) when no pairwise file is at hand."""
    groups: dict[tuple[str, str, tuple[str, ...]], list[JudgeExample]] = {}
    for ex in examples:
        groups.setdefault((ex.instruction, ex.criteria, tuple(ex.score_descriptions)), []).append(ex)
    pairs = []
    for (instruction, criteria, _), exs in groups.items():
        for x, y in combinations(exs, 2):
            if abs(x.score - y.score) < min_gap:
                continue
            hi, lo = (x, y) if x.score > y.score else (y, x)
            a, b = (hi, lo) if len(pairs) % 2 == 0 else (lo, hi)
            pairs.append(PairExample(
                id=f"{a.id}|{b.id}", instruction=instruction, response_a=a.response, response_b=b.response,
                rubric=f"[{criteria}]", preference=1.0 if a is hi else 0.0, reference_answer=a.reference_answer,
                category=a.category))
    return pairs


def read_vicuna_pairs(path: str | Path, *, min_gap: float = VICUNA_MIN_GAP) -> list[PairExample]:
    """The Vicuna Bench (prometheus-eval's ``vicuna_eval.json``) as pairs by gold-score difference."""
    exs = read_examples(str(path), "prometheus-eval", require_feedback=False).examples
    return pairs_from_absolute(exs, min_gap=min_gap)
