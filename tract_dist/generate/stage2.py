"""Stage-2 dataset: each self-generated CoT paired with its example's gold score, in the project's JSONL schema.

Training renders the target as ``{feedback} So the overall score is {gold}`` (``prompts.render_target``), so a
record here is the source example with ``feedback`` = the generated CoT, ``score`` = the gold score and ``id``
= the CoT's uid (``{example id}#cot{k}``). Examples left without any usable CoT are counted and listed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from tract_dist.data.formats import write_jsonl
from tract_dist.data.prompts import normalize_feedback
from tract_dist.data.schema import JudgeExample
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


def build_stage2_dataset(generated_dir: str | Path, source_examples: list[JudgeExample],
                         out_path: str | Path) -> dict[str, Any]:
    """Write the stage-2 JSONL and return its statistics (written, unusable by reason, examples without CoT)."""
    source = {ex.id: ex for ex in source_examples}
    records = read_generated(generated_dir)
    out: list[JudgeExample] = []
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
        out.append(replace(ex, id=r["uid"], feedback=cot, score=ex.score))
        covered.add(ex.id)
    order = {ex.id: i for i, ex in enumerate(source_examples)}
    out.sort(key=lambda e: (order[e.id.rsplit("#cot", 1)[0]], e.id))  # source order, then CoT index
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
    }
