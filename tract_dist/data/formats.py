"""Readers: Feedback Collection / Feedback Bench, prometheus-eval benchmark JSON, the project's JSONL.

Local JSON / JSON Lines files are parsed here (strict UTF-8, every syntax error named by file, record and
line, an empty file called one); Parquet files and ``hf:NAME`` hub datasets load through ``datasets``. Every
record is then validated into the normalised schema of :class:`JudgeExample`. A malformed record raises
:class:`DataError` naming file, record and field, unless ``skip_invalid`` is set, in which case it is skipped
and counted (never dropped silently).

Scores: a JSON number, or a string holding a plain decimal number (Feedback Collection stores ``orig_score``
as a string such as ``"4"``); booleans and any other string ("four", "4/5", "nan", "1e0") are rejected.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tract_dist import jsontext
from tract_dist.data.prompts import normalize_feedback, parse_prompt
from tract_dist.data.schema import DataError, JudgeExample

FORMATS = ("feedback-collection", "prometheus-eval", "jsonl")


@dataclass
class InvalidRecord:
    index: int
    field: str | None
    message: str


@dataclass
class ReadResult:
    """Valid examples plus an account of everything that was not valid."""

    path: str
    format: str
    records: int
    examples: list[JudgeExample]
    invalid: list[InvalidRecord] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "records": self.records,
                "valid": len(self.examples), "invalid": len(self.invalid)}


class _RecordError(Exception):
    def __init__(self, field_name: str | None, message: str):
        super().__init__(message)
        self.field = field_name
        self.message = message


def _str(rec: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    v = rec.get(key)
    if v is None:
        if required:
            raise _RecordError(key, "missing")
        return None
    if not isinstance(v, str):
        raise _RecordError(key, f"expected a string, got {type(v).__name__}")
    if required and not v.strip():
        raise _RecordError(key, "empty")
    return v


_DECIMAL = re.compile(r"\s*[0-9]+(?:\.[0-9]+)?\s*\Z")


def _score(v: Any, key: str, lo: int, hi: int, *, integer: bool) -> float:
    if v is None:
        raise _RecordError(key, "missing")
    if isinstance(v, bool):  # float(True) == 1.0: a boolean is a data error, not a score of 1
        raise _RecordError(key, f"expected a number, got a boolean ({str(v).lower()})")
    if isinstance(v, str) and not _DECIMAL.match(v):
        raise _RecordError(key, f"not a number: {v!r}")
    if not isinstance(v, (int, float, str)):
        raise _RecordError(key, f"expected a number, got {type(v).__name__}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise _RecordError(key, f"not a number: {v!r}") from None
    if math.isnan(x) or not lo <= x <= hi:
        raise _RecordError(key, f"score {v!r} is outside the scale {lo}..{hi}")
    if integer and x != int(x):
        raise _RecordError(key, f"score {v!r} is not an integer")
    return x


def _feedback(text: str | None, key: str, required: bool) -> str | None:
    if text is None:
        if required:
            raise _RecordError(key, "missing")
        return None
    fb = normalize_feedback(text)
    if not fb:
        if required:
            raise _RecordError(key, "empty feedback (nothing left once the score statement is removed)")
        return None
    return fb


def _from_feedback_collection(rec: dict[str, Any], i: int, lo: int, hi: int, need_fb: bool) -> JudgeExample:
    descs = [_str(rec, f"orig_score{k}_description") for k in range(lo, hi + 1)]
    return JudgeExample(
        id=_id(rec, i),
        instruction=_str(rec, "orig_instruction"),
        response=_str(rec, "orig_response"),
        reference_answer=_str(rec, "orig_reference_answer", required=False) or None,
        criteria=_str(rec, "orig_criteria"),
        score_descriptions=descs,
        feedback=_feedback(_str(rec, "output", required=need_fb), "output", need_fb),
        score=_score(rec.get("orig_score"), "orig_score", lo, hi, integer=True),
    )


def _from_prometheus_eval(rec: dict[str, Any], i: int, lo: int, hi: int, need_fb: bool) -> JudgeExample:
    prompt = _str(rec, "instruction")
    try:
        p = parse_prompt(prompt)
    except ValueError as e:
        raise _RecordError("instruction", str(e)) from None
    if (p["scale_min"], p["scale_max"]) != (lo, hi):
        raise _RecordError("instruction", f"rubric scale {p['scale_min']}-{p['scale_max']} != configured {lo}-{hi}")
    scores = rec.get("gpt4_score")
    if not isinstance(scores, list) or not scores:
        raise _RecordError("gpt4_score", "expected a non-empty list of scores")
    label = sum(_score(s, "gpt4_score", lo, hi, integer=False) for s in scores) / len(scores)
    return JudgeExample(
        id=_id(rec, i),  # benchmark "idx" repeats per response
        instruction=p["instruction"], response=p["response"], reference_answer=p["reference_answer"],
        criteria=p["criteria"], score_descriptions=p["score_descriptions"],
        feedback=_feedback(_first_feedback(rec.get("gpt4_feedback")), "gpt4_feedback", need_fb), score=label,
        category=_category(rec),
    )


def _first_feedback(fbs: Any) -> str | None:
    """prometheus-eval's ``gpt4_feedback``: a list of feedback strings (one per GPT-4 grading; the first is the
    CoT) or one string. Anything else is named, never passed on (numbers there crashed ``normalize_feedback``)."""
    if fbs is None or fbs == []:
        return None
    if isinstance(fbs, str):
        return fbs
    if isinstance(fbs, list):
        bad = sorted({type(x).__name__ for x in fbs if not isinstance(x, str)})
        if bad:
            raise _RecordError("gpt4_feedback", f"expected a list of strings, got a list holding {', '.join(bad)}")
        return fbs[0]
    raise _RecordError("gpt4_feedback", f"expected a string or a list of strings, got {type(fbs).__name__}")


def _id(rec: dict[str, Any], i: int) -> str:
    """The record's ``id`` (a string or an integer; absent: its position). A list, object, boolean or float
    would become an id that no one wrote (``"[1]"``, ``"True"``, ``"1.0"``), so it is named instead."""
    v = rec.get("id")
    if v is None:
        return str(i)
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise _RecordError("id", f"expected a string or an integer, got {type(v).__name__}")
    if isinstance(v, str) and not v.strip():
        raise _RecordError("id", "empty")
    return str(v)


def _category(rec: dict[str, Any]) -> str | None:
    """The optional ``category`` (per-category metrics): a string, or absent; another type is named, not
    dropped (its records would silently leave their category's metrics)."""
    v = rec.get("category")
    if v is not None and not isinstance(v, str):
        raise _RecordError("category", f"expected a string, got {type(v).__name__}")
    return v


def _from_jsonl(rec: dict[str, Any], i: int, lo: int, hi: int, need_fb: bool) -> JudgeExample:
    descs = rec.get("score_descriptions")
    if not isinstance(descs, list) or len(descs) != hi - lo + 1 or not all(isinstance(d, str) and d for d in descs):
        raise _RecordError("score_descriptions", f"expected {hi - lo + 1} non-empty strings")
    return JudgeExample(
        id=_id(rec, i),
        instruction=_str(rec, "instruction"), response=_str(rec, "response"),
        reference_answer=_str(rec, "reference_answer", required=False) or None,
        criteria=_str(rec, "criteria"), score_descriptions=descs,
        feedback=_feedback(_str(rec, "feedback", required=need_fb), "feedback", need_fb),
        score=_score(rec.get("score"), "score", lo, hi, integer=False),
        category=_category(rec),
        weight=_weight(rec.get("weight")),
    )


def _weight(v: Any) -> float | None:
    """An optional training weight: a finite JSON number (signed allowed); absent or null: unweighted."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _RecordError("weight", f"expected a number, got {type(v).__name__}")
    if not math.isfinite(float(v)):
        raise _RecordError("weight", f"not a finite number: {v!r}")
    return float(v)


_CONVERTERS: dict[str, Callable[[dict[str, Any], int, int, int, bool], JudgeExample]] = {
    "feedback-collection": _from_feedback_collection,
    "prometheus-eval": _from_prometheus_eval,
    "jsonl": _from_jsonl,
}


def load_records(source: str, split: str = "train") -> Iterator[dict[str, Any]] | Any:
    """Raw records: a local .json (array) / .jsonl file parsed here, a .parquet file or ``hf:NAME`` through
    ``datasets``."""
    if source.startswith("hf:"):
        import datasets

        datasets.disable_progress_bars()
        return datasets.load_dataset(source[3:], split=split)
    path = Path(source)
    if not path.is_file():
        raise DataError(source, "file not found" if not path.exists() else "not a regular file")
    if path.suffix != ".parquet":
        return read_json_records(path)
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset("parquet", data_files=str(path), split="train", keep_in_memory=True)
    except Exception as e:  # datasets wraps the parser's error; keep its message, name the file
        cause = e.__cause__ or e
        raise DataError(source, f"cannot be parsed as parquet: {type(cause).__name__}: {cause}") from e


def decode_text(path: str | Path, data: bytes) -> str:
    """UTF-8 text (a byte-order mark is accepted); UTF-16 and legacy encodings are named, not a traceback."""
    from tract_dist.fsutil import decode_utf8

    try:
        return decode_utf8(data)
    except UnicodeError as e:
        raise DataError(str(path), str(e)) from None


def read_json_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a local JSON array (``[{...}, ...]``) or JSON Lines file.

    Errors name the file, the record (0-based, as everywhere) and the line: an empty file, a truncated or
    malformed record, a record that is not an object."""
    path = Path(path)
    text = decode_text(path, path.read_bytes())
    if not text.strip():
        raise DataError(str(path), "empty file (no records)")
    if text.lstrip().startswith("["):
        return _json_array(path, text)
    records: list[dict[str, Any]] = []
    lines = text.splitlines()
    last = max(i for i, line in enumerate(lines) if line.strip())
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = jsontext.loads(line)
        except jsontext.JSONNestingError as e:
            raise DataError(str(path), f"line {lineno} cannot be parsed as JSON: {e.msg} at column {e.colno}",
                            index=len(records), field_name=e.field) from None
        except json.JSONDecodeError as e:
            hint = "; the file ends inside this record (truncated?)" if lineno - 1 == last else ""
            raise DataError(str(path), f"line {lineno} cannot be parsed as JSON: {e.msg} at column {e.colno}{hint}",
                            index=len(records)) from None
        if not isinstance(obj, dict):
            raise DataError(str(path), f"line {lineno}: expected one JSON object per line, got "
                                       f"{type(obj).__name__}", index=len(records))
        records.append(obj)
    return records


def _json_array(path: Path, text: str) -> list[dict[str, Any]]:
    """A JSON array of objects, element by element, so an error names the record it is in."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    records: list[dict[str, Any]] = []

    def fail(msg: str, at: int, field_name: str | None = None) -> DataError:
        line = text.count("\n", 0, at) + 1
        return DataError(str(path), f"cannot be parsed as a JSON array: {msg} (line {line})", index=len(records),
                         field_name=field_name)

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        if text[skip_ws(pos + 1):].strip():
            raise fail("text after the closing ']'", pos)
        raise DataError(str(path), "empty JSON array (no records)")
    while True:
        if pos >= len(text):
            raise fail("the file ends inside the array (truncated?)", pos)
        try:
            obj, pos = jsontext.raw_decode(dec, text, pos)
        except jsontext.JSONNestingError as e:
            raise fail(e.msg, e.pos, e.field) from None
        except json.JSONDecodeError as e:
            truncated = " (the file ends inside this record: truncated?)" if e.pos >= len(text.rstrip()) - 1 else ""
            raise fail(f"{e.msg}{truncated}", e.pos) from None
        if not isinstance(obj, dict):
            raise fail(f"expected an object, got {type(obj).__name__}", pos)
        records.append(obj)
        pos = skip_ws(pos)
        if pos >= len(text):
            raise fail("the file ends after this record, without ']' (truncated?)", pos)
        if text[pos] == "]":
            if text[pos + 1:].strip():
                raise fail("text after the closing ']'", pos)
            return records
        if text[pos] != ",":
            raise fail(f"expected ',' or ']' after a record, found {text[pos]!r}", pos)
        pos = skip_ws(pos + 1)


def convert_records(source: str, records: Iterable[tuple[int, dict[str, Any]]],
                    convert: Callable[[dict[str, Any], int], Any],
                    skip_invalid: bool) -> tuple[list[Any], list[InvalidRecord]]:
    """``convert(record, index)`` over ``(index, record)`` pairs, ids unique: the valid items and an account of
    the invalid records (the first raised as a :class:`DataError` naming file, record and field unless
    ``skip_invalid``). Single-response and pairwise readers share it."""
    items: list[Any] = []
    invalid: list[InvalidRecord] = []
    seen: set[str] = set()
    for i, rec in records:
        try:
            item = convert(rec, i)
            if item.id in seen:
                raise _RecordError("id", f"duplicate id {item.id!r}")
            seen.add(item.id)
            items.append(item)
        except _RecordError as e:
            if not skip_invalid:
                raise DataError(source, e.message, index=i, field_name=e.field) from None
            invalid.append(InvalidRecord(i, e.field, e.message))
    return items, invalid


def read_examples(source: str, fmt: str, *, scale: tuple[int, int] = (1, 5), skip_invalid: bool = False,
                  require_feedback: bool = True, limit: int | None = None, split: str = "train",
                  offset: int = 0) -> ReadResult:
    """Read and validate records ``offset .. offset + limit`` of ``source`` in format ``fmt``.

    Record indices in errors are positions in the file, whatever the offset."""
    if fmt not in _CONVERTERS:
        from tract_dist.data.pair_formats import PAIR_FORMATS

        if fmt in PAIR_FORMATS:  # a TractError (exit 2), not a traceback, where a command reads single responses
            raise DataError(source, f"format {fmt} holds pairs (relative grading, data/pair_formats.py); this step "
                                    f"reads single responses: {', '.join(FORMATS)}")
        raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    convert = _CONVERTERS[fmt]
    lo, hi = scale
    ds = load_records(source, split)
    end = len(ds) if limit is None else min(offset + limit, len(ds))
    examples, invalid = convert_records(source, islice(enumerate(ds), offset, end),
                                        lambda rec, i: convert(rec, i, lo, hi, require_feedback), skip_invalid)
    return ReadResult(path=source, format=fmt, records=max(0, end - offset), examples=examples, invalid=invalid)


def write_jsonl(examples: list[JudgeExample], path: str | Path) -> None:
    """Write examples in the project's normalised JSONL schema, atomically and durably (a converted data set
    and the stage-2 data set are inputs that later runs train on)."""
    from tract_dist.fsutil import atomic_write_jsonl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(path, (ex.to_dict() for ex in examples))
