"""Convert any supported data file to the project's JSONL through the project's own readers.

Going through :func:`read_examples` (never a hand-written field mapping) means the JSONL holds exactly the
examples training, generation and evaluation would have read from the original file: same ids, labels
(e.g. the mean of a benchmark's ``gpt4_score``), CoT and parsed prompt fields. That is what lets a small,
committed sample stand in for a large benchmark file (``data/quickstart/``, see its NOTICE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tract_dist.data.formats import read_examples, write_jsonl
from tract_dist.data.schema import DataError


def convert_to_jsonl(source: str, fmt: str, output: str | Path, *, scale: tuple[int, int] = (1, 5),
                     offset: int = 0, limit: int | None = None, skip_invalid: bool = False,
                     split: str = "train") -> dict[str, Any]:
    """Write records ``offset .. offset + limit`` of ``source`` (format ``fmt``) to ``output`` as JSONL.

    Feedback is not required (evaluation sets may have none; it is written as null). Ids are the reader's:
    a record's own ``id``, else its index in ``source``, so every converted record names where it came from.
    Raises DataError (file, record, field) on a malformed record unless ``skip_invalid``, and when nothing
    valid is left to write. Returns a summary for the command line.
    """
    out = Path(output)
    if not source.startswith("hf:") and out.resolve() == Path(source).resolve():
        raise DataError(str(output), "the output would overwrite the input file; choose another --output")
    read = read_examples(source, fmt, scale=scale, skip_invalid=skip_invalid, require_feedback=False,
                         limit=limit, split=split, offset=offset)
    if not read.examples:
        last = str(offset + limit - 1) if limit else "the end"
        raise DataError(source, f"no valid record in records {offset}..{last} ({read.records} read, "
                                f"{len(read.invalid)} invalid); nothing written")
    write_jsonl(read.examples, out)
    return {**read.summary(), "offset": offset, "output": str(out), "written": len(read.examples),
            "first_id": read.examples[0].id, "last_id": read.examples[-1].id,
            "invalid_records": [{"index": r.index, "field": r.field, "error": r.message} for r in read.invalid[:20]]}
