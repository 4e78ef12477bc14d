"""JSON text from users (data files, --json, --rubric, HTTP labels): nesting too deep to parse is a parse error.

Python's ``json`` decoder recurses once per nested array or object and raises ``RecursionError`` (not
``JSONDecodeError``) on a document nested about a thousand levels deep, e.g. a JSONL record of 5,000 ``[``: every
caller that reports ``JSONDecodeError`` as "file, record, line" would print a traceback instead. These wrappers
turn it into :class:`JSONNestingError`, a ``JSONDecodeError`` with the line and column where the nesting passes
the limit, so the callers' existing handlers name it. No judge record nests more than a few levels.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 500
"""Nesting reported as the limit: well inside what Python's recursive decoder survives (its recursion limit,
1000 by default, minus the caller's frames); where the decoder actually stopped depends on the stack in use."""


class JSONNestingError(json.JSONDecodeError):
    """A JSON document nested deeper than the decoder can follow; ``field``: the top-level object's key whose
    value holds the nesting (None when the document is not an object)."""

    def __init__(self, msg: str, doc: str, pos: int, field: str | None = None):
        super().__init__(msg, doc, pos)
        self.field = field


def loads(text: str) -> Any:
    """``json.loads``; a document too deeply nested raises :class:`JSONNestingError` instead of ``RecursionError``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise _nesting_error(text, 0) from None


def raw_decode(decoder: json.JSONDecoder, text: str, pos: int) -> tuple[Any, int]:
    """``decoder.raw_decode(text, pos)`` with the same treatment of deep nesting as :func:`loads`."""
    try:
        return decoder.raw_decode(text, pos)
    except RecursionError:
        raise _nesting_error(text, pos) from None


def _nesting_error(text: str, start: int) -> JSONNestingError:
    """The error, positioned at the bracket that opens level ``MAX_DEPTH + 1``, naming the top-level key above
    it (a linear scan of the value that starts at ``start``, strings skipped; only run once parsing failed)."""
    depth, i, n, at = 0, start, len(text), start
    top_is_object = False
    string_start = -1
    last_top_string: str | None = None  # the last string closed directly inside the top-level object
    field: str | None = None
    escaped = False
    while i < n:
        c = text[i]
        if string_start >= 0:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                if depth == 1 and top_is_object:
                    try:
                        last_top_string = json.loads(text[string_start:i + 1])
                    except ValueError:
                        last_top_string = text[string_start + 1:i]
                string_start = -1
        elif c == '"':
            string_start = i
        elif c in "[{":
            depth += 1
            if depth == 1:
                top_is_object = c == "{"
            elif depth == 2:
                field = last_top_string if top_is_object else None
            if depth > MAX_DEPTH:
                at = i
                break
        elif c in "]}":
            depth -= 1
            if depth <= 0:
                break
        i += 1
    return JSONNestingError(f"nested more than {MAX_DEPTH} levels deep (arrays/objects inside each other); "
                            "too deep to parse", text, at, field)
