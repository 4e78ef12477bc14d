"""Stage-2 dataset: each self-generated CoT paired with its example's gold score, in the project's JSONL schema.

Training renders the target as ``{feedback} So the overall score is {gold}`` (``prompts.render_target``), so a
record here is the source example with ``feedback`` = the generated CoT, ``score`` = the gold score and ``id``
= the CoT's uid (``{example id}#cot{k}``). Examples left without any usable CoT are counted and listed.

Which usable CoTs are written, and with what ``weight``, is ``generation.select``'s decision
(:mod:`tract_dist.generate.select`, from each CoT's stored RAIL read-out against the gold score); its counts are
returned under ``selection``. Only ``weighted`` writes a ``weight`` field, so the other rules write the schema
(and, with ``all``, the file) stage 2 always read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from tract_dist.data.formats import write_jsonl
from tract_dist.data.prompts import normalize_feedback
from tract_dist.data.schema import DataError, JudgeExample
from tract_dist.generate.select import Candidate, SelectionSpec, select_cots
from tract_dist.generate.shards import read_generated
from tract_dist.protocol import SCORE_PHRASE

_MAX_LISTED = 50  # ids listed in the stats (all are counted)


def usable_cot(cot: str | None) -> tuple[str | None, str | None]:
    """(cot, None) when the CoT can be a training target, else (None, reason)."""
    if cot is None:
        return None, "missing_cot"
    text = normalize_feedback(cot)
    if not text:
        return None, "empty_cot"
    if SCORE_PHRASE in text:  # the target would state a score twice
        return None, "contains_score_phrase"
    return text, None


def readout_score(record: dict[str, Any], values: list[int] | None, normalize: bool) -> float | None:
    """A generated CoT's ŷ: from its score-token probabilities under ``normalize`` when they are stored (and
    ``values`` given), else the ŷ the generation wrote, else None (a record from before read-outs existed)."""
    probs = record.get("rail_probs")
    if probs and values is not None and len(probs) == len(values):
        mass = sum(probs)
        if normalize and mass <= 0:
            return None
        return sum(v * p for v, p in zip(values, probs)) / (mass if normalize else 1.0)
    y = record.get("yhat")
    return None if y is None else float(y)


def build_stage2_dataset(generated_dir: str | Path, source_examples: list[JudgeExample], out_path: str | Path,
                         selection: SelectionSpec | None = None, *, score_values: list[int] | None = None,
                         rail_normalize: bool = False) -> dict[str, Any]:
    """Write the stage-2 JSONL and return its statistics (written, unusable by reason, examples without CoT, and
    the selection's counts under ``selection``). ``score_values``: the scale's values, to read ŷ from the stored
    probabilities with ``rail_normalize`` (the stage-1 judge's read-out)."""
    selection = selection or SelectionSpec()
    source = {ex.id: ex for ex in source_examples}
    records = read_generated(generated_dir)
    usable: list[tuple[JudgeExample, dict[str, Any], str]] = []
    seen: set[str] = set()
    unusable: Counter[str] = Counter()
    unknown: list[str] = []
    duplicates = 0
    covered: set[str] = set()
    # A retried CoT has several records: its ok one wins, else its latest failure; a second ok is a duplicate.
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        prev = best.get(r["uid"])
        if prev is not None and prev["status"] == "ok":
            duplicates += r["status"] == "ok"
            continue
        best[r["uid"]] = r
    for r in best.values():
        if r["uid"] in seen:
            continue
        seen.add(r["uid"])
        ex = source.get(r["example_id"])
        if ex is None:
            unknown.append(r["example_id"])
            continue
        if r["status"] != "ok":
            unusable[f"generation_failed: {r.get('reason')}"] += 1
            continue
        cot, why = usable_cot(r.get("cot"))
        if cot is None:
            unusable[why or "unknown"] += 1
            continue
        usable.append((ex, r, cot))
        covered.add(ex.id)
    order = {ex.id: i for i, ex in enumerate(source_examples)}
    usable.sort(key=lambda u: (order[u[0].id], u[1]["uid"]))  # source order, then uid (as ever: the file of `all`)
    cands = [Candidate(uid=r["uid"], prompt=ex.id, index=int(r.get("cot_index") or 0),
                       yhat=readout_score(r, score_values, rail_normalize), gold=float(ex.score))
             for ex, r, _ in usable]
    if selection.rule != "all" and cands and all(c.yhat is None for c in cands):
        raise DataError(str(generated_dir), f"generation.select={selection.rule} needs each CoT's RAIL read-out, and "
                        "none of these CoTs has one (generated before read-outs were stored); regenerate them "
                        "(tract-dist generate --fresh, or pipeline --fresh), or use generation.select=all")
    kept, sel_stats = select_cots(cands, selection)
    if cands and not kept:
        raise DataError(str(generated_dir), f"generation.select={selection.rule} (tolerance {selection.tolerance:g}, "
                        f"fallback {selection.fallback}) kept none of the {len(cands)} usable CoTs: no CoT's read-out "
                        "is within the tolerance of its gold score; raise generation.select_tolerance or use "
                        "generation.select_fallback=nearest")
    weight_of = {c.uid: w for c, w in kept}
    out = [replace(ex, id=r["uid"], feedback=cot, score=ex.score,
                   weight=weight_of[r["uid"]] if selection.rule == "weighted" else None)
           for ex, r, cot in usable if r["uid"] in weight_of]
    write_jsonl(out, out_path)
    without = [ex.id for ex in source_examples if ex.id not in covered]
    return {
        "path": str(out_path),
        "source_examples": len(source_examples),
        "generated_records": len(records),
        "written": len(out),
        "unusable": sum(unusable.values()),
        "unusable_reasons": dict(unusable),
        "examples_without_cot": len(without),
        "examples_without_cot_ids": without[:_MAX_LISTED],
        "unknown_example_ids": len(unknown),
        "duplicates": duplicates,
        "selection": sel_stats,
    }
