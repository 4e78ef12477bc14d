"""Read, validate, render and tokenise a data file and summarise what happened to every record."""

from __future__ import annotations

import statistics
from typing import Any

from tract_dist.data.assets import load_tokenizer
from tract_dist.data.encode import EncodeOptions, encode_examples
from tract_dist.data.formats import read_examples
from tract_dist.data.score_scale import derive_score_scale
from tract_dist.data.score_tokens import parse_scale
from tract_dist.protocol import IGNORE_INDEX


def inspect_data(path: str, fmt: str, tokenizer_name: str, *, max_length: int = 3000, scale: str = "1-5",
                 skip_invalid: bool = False, truncation: str = "truncate",
                 system_prompt: str | None = None, split: str = "train",
                 enable_thinking: bool = False) -> dict[str, Any]:
    """The summary printed by ``tract-dist data inspect``: counts of records, invalid, truncated and dropped."""
    lo_hi = parse_scale(scale)
    tok = load_tokenizer(tokenizer_name)
    full = derive_score_scale(tok, lo_hi)
    st: Any = full.score_tokens() if full.single_token else full
    read = read_examples(path, fmt, scale=lo_hi, skip_invalid=skip_invalid, split=split)
    opts = EncodeOptions(max_length=max_length, truncation=truncation, scale=lo_hi,  # type: ignore[arg-type]
                         enable_thinking=enable_thinking)
    if system_prompt is not None:
        opts.system_prompt = system_prompt or None
    encoded, stats = encode_examples(tok, read.examples, st, opts)
    lengths = [len(e.input_ids) for e in encoded]
    labels = [ex.score for ex in read.examples]
    return {
        "path": path,
        "format": fmt,
        "tokenizer": tokenizer_name,
        "records": read.records,
        "valid": len(read.examples),
        "invalid": len(read.invalid),
        "invalid_records": [{"index": r.index, "field": r.field, "error": r.message} for r in read.invalid[:20]],
        "encoded": stats.encoded,
        "truncated": stats.truncated,
        "dropped": stats.dropped,
        "drop_reasons": stats.drop_reasons,
        "label_mean": statistics.fmean(labels) if labels else None,
        "score_token_ids": st.token_ids if full.single_token else [],
        "scores": full.scores,
        **({} if full.single_token else {"score_sequences": [list(q) for q in full.sequences]}),
        "max_length": max_length,
        "tokens_mean": statistics.fmean(lengths) if lengths else None,
        "tokens_max": max(lengths) if lengths else None,
        "target_tokens_mean": statistics.fmean(sum(x != IGNORE_INDEX for x in e.labels) for e in encoded) if encoded else None,
    }
