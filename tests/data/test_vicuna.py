"""The real Vicuna Bench set: parsing, labels, prompt round trip and the score position for real tokenizers."""

import json

import numpy as np
import pytest

from tract_dist.data.encode import IGNORE_INDEX, EncodeOptions, encode_examples
from tract_dist.data.formats import read_examples
from tract_dist.data.prompts import SCORE_PHRASE, render_prompt
from tract_dist.data.score_tokens import derive_score_tokens


@pytest.fixture(scope="module")
def raw(vicuna_path):
    return json.loads(vicuna_path.read_text())


@pytest.fixture(scope="module")
def read(vicuna_path):
    return read_examples(str(vicuna_path), "prometheus-eval")


def test_all_records_parse_and_labels_are_means(raw, read):
    assert len(raw) == 320 and read.records == 320 and len(read.examples) == 320 and not read.invalid
    want = np.array([np.mean(np.asarray(r["gpt4_score"], dtype=np.float64)) for r in raw])
    got = np.array([e.score for e in read.examples])
    np.testing.assert_array_equal(got, want)
    assert [e.category for e in read.examples] == [r["category"] for r in raw]


def test_rendered_prompts_round_trip(raw, read):
    for r, ex in zip(raw, read.examples):
        assert render_prompt(ex) == r["instruction"]


@pytest.mark.parametrize("name", ["mistral", "llama3", "smollm2"])
def test_score_position_and_labels(tokenizers, read, raw, name):
    tok = tokenizers[name]
    st = derive_score_tokens(tok)
    enc, stats = encode_examples(tok, read.examples, st, EncodeOptions(max_length=4096))
    assert stats.encoded == 320 and stats.dropped == 0 and stats.truncated == 0
    for e, r in zip(enc, raw):
        gold = int(np.floor(np.mean(r["gpt4_score"]) + 0.5))
        s = e.score_position
        assert tok.decode([e.input_ids[s + 1]]).strip() == str(gold)
        assert e.score_token_id == e.input_ids[s + 1]
        assert e.labels[s + 1] == IGNORE_INDEX  # score token is not in CE
        assert e.labels[-1] == tok.eos_token_id == e.input_ids[-1]
        assert tok.decode(e.input_ids[: s + 1]).rstrip().endswith(SCORE_PHRASE)
        # Prompt fully masked, CoT fully supervised.
        first = next(i for i, x in enumerate(e.labels) if x != IGNORE_INDEX)
        assert all(x == IGNORE_INDEX for x in e.labels[:first])
        assert e.labels[first: s + 1] == e.input_ids[first: s + 1]
        # Llama-3.1's template trims message content, so the prompt's trailing space is not compared.
        assert r["instruction"].rstrip() in tok.decode(e.input_ids[:first])


def test_truncation_counts_and_never_cuts_the_target(tokenizers, read):
    tok = tokenizers["llama3"]
    st = derive_score_tokens(tok)
    enc, stats = encode_examples(tok, read.examples, st, EncodeOptions(max_length=768))
    assert stats.truncated > 0 and stats.encoded + stats.dropped == 320
    assert sum(e.truncated for e in enc) == stats.truncated
    assert sum(stats.drop_reasons.values()) == stats.dropped
    by_id = {e.id: e for e in read.examples}
    for e in enc:
        assert len(e.input_ids) <= 768
        fb = by_id[e.id].feedback
        assert fb[-40:] in tok.decode(e.input_ids[e.score_position - 60: e.score_position + 1])
    _, dstats = encode_examples(tok, read.examples, st, EncodeOptions(max_length=768, truncation="drop"))
    assert dstats.truncated == 0 and dstats.dropped == stats.truncated + stats.dropped


def test_score_only_targets_for_raft(tokenizers, read):
    tok = tokenizers["llama3"]
    st = derive_score_tokens(tok)
    enc, _ = encode_examples(tok, read.examples[:5], st, EncodeOptions(max_length=4096, use_cot=False))
    for e in enc:
        first = next(i for i, x in enumerate(e.labels) if x != IGNORE_INDEX)
        assert tok.decode(e.input_ids[first:]) == f"{SCORE_PHRASE} {tok.decode([e.score_token_id])}<|eot_id|>"
