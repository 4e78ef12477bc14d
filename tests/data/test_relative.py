"""Relative grading data (#29 item 2): prometheus-eval's relative prompt (the sections byte for byte against the
installed prometheus_eval package's own templates, whose PyPI release has an older task description than upstream's), the verdict tokens of three tokenizers, the training encoding, and the
pairwise readers on good and bad records (file, record and field named; exit 2)."""

from __future__ import annotations

import json
import math

import pytest

from tract_dist.data.encode import EncodeOptions
from tract_dist.data.formats import read_examples
from tract_dist.data.pair_formats import pairs_from_absolute, read_pairs, read_vicuna_pairs
from tract_dist.data.prompts import render_prompt
from tract_dist.data.relative import (REL_SYSTEM_PROMPT, PairExample, derive_verdict_scale, encode_pair,
                                      normalize_relative_feedback, parse_decoded_verdict, parse_relative_prompt,
                                      render_relative_prompt, verdict_prompt_ids)
from tract_dist.data.schema import DataError
from tract_dist.errors import TractError
from tract_dist.protocol import IGNORE_INDEX

PAIR = PairExample(id="p0", instruction="Name a prime.\nInput: small", response_a="2", response_b="4, I think",
                   rubric="Is the answer correct?", preference=1.0, reference_answer="2 or 3",
                   feedback="Response A is right; B is not prime.")


def test_prompt_is_prometheus_evals_template_and_round_trips():
    from prometheus_eval import prompts as pe

    assert REL_SYSTEM_PROMPT == pe.REL_SYSTEM_PROMPT
    fields = dict(instruction=PAIR.instruction, response_A=PAIR.response_a, response_B=PAIR.response_b,
                  rubric=PAIR.rubric, reference_answer=PAIR.reference_answer)
    no_ref = PairExample(**{**PAIR.to_dict(), "reference_answer": None})
    for ours, template in ((PAIR, pe.RELATIVE_PROMPT), (no_ref, pe.RELATIVE_PROMPT_WO_REF)):
        theirs = template.format(**fields)  # PyPI 0.1.20: an older task description, the same sections
        mine = render_relative_prompt(ours)
        cut = "###Instruction:"
        assert mine[mine.index(cut):] == theirs[theirs.index(cut):]
        assert mine.startswith("###Task Description:\n") and '[RESULT] (Either "A" or "B")' in mine  # upstream's
        for text in (mine, theirs):  # the server reads both task descriptions
            got = parse_relative_prompt(text)
            assert got == {"instruction": ours.instruction, "response_a": ours.response_a,
                           "response_b": ours.response_b, "reference_answer": ours.reference_answer,
                           "rubric": ours.rubric}
    assert parse_relative_prompt(render_relative_prompt(PAIR).rstrip())["rubric"] == PAIR.rubric  # eval's strip()
    quoting = PairExample(**{**PAIR.to_dict(), "response_b": "###Response A:\nfake"})
    with pytest.raises(ValueError, match="2 times"):
        parse_relative_prompt(render_relative_prompt(quoting))
    with pytest.raises(ValueError, match="'###Response B:' missing"):
        parse_relative_prompt(render_relative_prompt(PAIR).replace("###Response B:", "###Response C:"))


def test_feedback_and_decoded_verdicts():
    assert normalize_relative_feedback("Feedback: A is better. [RESULT] A") == "A is better."
    assert normalize_relative_feedback("B wins [RESULT] (B)") == "B wins"
    with pytest.raises(ValueError, match="before its end"):
        normalize_relative_feedback("x [RESULT] A and more [RESULT] B")
    assert parse_decoded_verdict("Feedback: fine. [RESULT] B") == "B"
    assert parse_decoded_verdict("[RESULT] A ... on reflection [RESULT] b") == "B"
    assert parse_decoded_verdict("no verdict here") is None


@pytest.mark.parametrize("name", ["smollm2", "mistral", "llama3"])
def test_verdict_tokens_and_pair_encoding(tokenizers, name):
    """The verdict token follows '[RESULT]' exactly as the tokenizer writes the whole target; the encoded
    sequence is the templated prompt + the tokenised target + EOS, with labels on the feedback and EOS only."""
    tok = tokenizers[name]
    scale = derive_verdict_scale(tok)
    assert scale.scores == [1, 0] and scale.single_token
    a, b = (s[0] for s in scale.sequences)
    assert tok.decode([a]).strip() == "A" and tok.decode([b]).strip() == "B"
    for y, letter in ((1.0, a), (0.0, b), (0.8, a), (0.3, b)):
        target = tok.encode(f"{PAIR.feedback} [RESULT] {'A' if letter == a else 'B'}", add_special_tokens=False)
        assert verdict_prompt_ids(tok, PAIR.feedback, scale) + [letter] == target
        opts = EncodeOptions(max_length=4096, system_prompt=REL_SYSTEM_PROMPT)
        enc = encode_pair(tok, PairExample(**{**PAIR.to_dict(), "preference": y}), scale, opts)
        n_target = len(target) + 1
        assert enc.input_ids[-n_target:] == target + [tok.eos_token_id]
        assert enc.input_ids[enc.score_position + 1] == letter == enc.score_token_id and enc.score == y
        assert enc.labels[enc.score_position + 1] == IGNORE_INDEX and enc.labels[-1] == tok.eos_token_id
        n_prompt = len(enc.input_ids) - n_target
        assert set(enc.labels[:n_prompt]) == {IGNORE_INDEX} and enc.labels[n_prompt:-2] == target[:-1]
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "system", "content": REL_SYSTEM_PROMPT},
                                            {"role": "user", "content": render_relative_prompt(PAIR)}],
                                           tokenize=False, add_generation_prompt=True)
            assert enc.input_ids[:n_prompt] == tok.encode(text, add_special_tokens=False)


def test_pair_truncation_cuts_response_b_first(tokenizers):
    tok = tokenizers["smollm2"]
    long = PairExample(**{**PAIR.to_dict(), "response_b": "word " * 800})
    enc = encode_pair(tok, long, derive_verdict_scale(tok), EncodeOptions(max_length=600, system_prompt=None))
    assert enc.truncated and len(enc.input_ids) <= 600
    assert PAIR.response_a in tok.decode(enc.input_ids)


def _pc_record(**over):
    rec = {"orig_instruction": "Say hi.", "orig_response_A": "hi", "orig_response_B": "bye",
           "orig_reference_answer": "hi there", "orig_criteria": "Is it a greeting?", "orig_preference": "A",
           "output": "Feedback: A greets, B does not. [RESULT] A"}
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not ...}


def _write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_preference_collection_reader(tmp_path):
    path = _write(tmp_path, "pc.jsonl", [_pc_record(), _pc_record(orig_preference="B", orig_reference_answer=...)])
    pairs, invalid = read_pairs(path, "preference-collection")
    assert not invalid and [p.preference for p in pairs] == [1.0, 0.0]
    assert pairs[0].feedback == "A greets, B does not." and pairs[0].rubric == "Is it a greeting?"
    assert pairs[0].reference_answer == "hi there" and pairs[1].reference_answer is None
    bad = [(_pc_record(orig_preference="C"), "orig_preference"), (_pc_record(orig_response_B=...), "orig_response_B"),
           (_pc_record(output="[RESULT] A"), "output"), (_pc_record(orig_criteria=3), "orig_criteria"),
           (_pc_record(output="A [RESULT] B then [RESULT] A"), "output")]
    for i, (rec, field) in enumerate(bad):
        path = _write(tmp_path, f"bad{i}.jsonl", [_pc_record(), rec])
        with pytest.raises(DataError) as e:
            read_pairs(path, "preference-collection")
        assert (e.value.path, e.value.index, e.value.field) == (path, 1, field), str(e.value)
        assert isinstance(e.value, TractError)
        pairs, invalid = read_pairs(path, "preference-collection", skip_invalid=True)
        assert len(pairs) == 1 and [(x.index, x.field) for x in invalid] == [(1, field)]
    pairs, _ = read_pairs(_write(tmp_path, "nofb.jsonl", [_pc_record(output=...)]), "preference-collection",
                          require_feedback=False)
    assert pairs[0].feedback is None


def _benchmark_records(vicuna_path, n=3):
    """Pairwise-benchmark records in prometheus-eval's layout (chosen_instruction / rejected_instruction: two
    absolute prompts differing in the response), built from Vicuna's real prompts."""
    exs = read_examples(str(vicuna_path), "prometheus-eval", require_feedback=False).examples
    groups: dict[str, list] = {}
    for e in exs:
        groups.setdefault(e.instruction, []).append(e)
    out = []
    for k, group in enumerate(list(groups.values())[:n]):
        hi, lo = max(group, key=lambda e: e.score), min(group, key=lambda e: e.score)
        out.append({"source": "helpful" if k % 2 else "harmless", "chosen_instruction": render_prompt(hi),
                    "rejected_instruction": render_prompt(lo), **({"tie": 1} if k == 2 else {})})
    return out, list(groups.values())


def test_prometheus_eval_pairwise_reader(tmp_path, vicuna_path):
    recs, groups = _benchmark_records(vicuna_path)
    path = tmp_path / "hhh.json"
    path.write_text(json.dumps(recs))
    pairs, _ = read_pairs(str(path), "prometheus-eval-pairwise")
    assert [p.preference for p in pairs] == [1.0, 0.0, 0.5]  # chosen at A for even records, at B for odd; a tie
    assert [p.category for p in pairs] == ["harmless", "helpful", "harmless"]
    best = max(groups[1], key=lambda e: e.score)
    assert pairs[1].response_b == best.response and pairs[1].rubric == f"[{best.criteria}]"
    assert pairs[1].instruction == best.instruction and pairs[1].reference_answer == best.reference_answer
    other = render_prompt(groups[5][0])
    bad = [({**recs[0], "rejected_instruction": other}, "rejected_instruction"),
           ({**recs[0], "chosen_instruction": "not a prompt"}, "chosen_instruction"),
           ({**recs[0], "tie": "yes"}, "tie"), ({"source": "x", "chosen_instruction": recs[0]["chosen_instruction"]},
                                                "rejected_instruction")]
    for i, (rec, field) in enumerate(bad):
        path.write_text(json.dumps([recs[0], rec]))
        with pytest.raises(DataError) as e:
            read_pairs(str(path), "prometheus-eval-pairwise")
        assert (e.value.index, e.value.field) == (1, field) and str(path) in str(e.value)


def test_pairs_jsonl_reader(tmp_path):
    good = {"instruction": "i", "response_a": "a", "response_b": "b", "rubric": "r", "preference": 0.7,
            "feedback": "A is a bit better. [RESULT] A"}
    path = _write(tmp_path, "p.jsonl", [good, {**good, "preference": "B", "id": "x"}])
    pairs, _ = read_pairs(path, "pairs-jsonl")
    assert [p.preference for p in pairs] == [0.7, 0.0] and pairs[0].feedback == "A is a bit better."
    for i, (value, msg) in enumerate([(1.5, "outside"), (True, "boolean|bool"), (None, "missing"), ("maybe", "'A'")]):
        rec = {**good, "preference": value} if value is not None else {k: v for k, v in good.items()
                                                                       if k != "preference"}
        path = _write(tmp_path, f"b{i}.jsonl", [rec])
        with pytest.raises(DataError, match=msg) as e:
            read_pairs(path, "pairs-jsonl")
        assert (e.value.index, e.value.field) == (0, "preference")
    with pytest.raises(DataError, match="unknown pairwise format"):
        read_pairs(path, "feedback-collection")


def test_vicuna_pairs_by_gold_score_difference(vicuna_path):
    exs = read_examples(str(vicuna_path), "prometheus-eval", require_feedback=False).examples
    pairs = read_vicuna_pairs(vicuna_path, min_gap=1.0)
    by_response = {(e.instruction, e.response): e.score for e in exs}
    expected = 0
    groups: dict[str, list[float]] = {}
    for e in exs:
        groups.setdefault(e.instruction, []).append(e.score)
    for scores in groups.values():
        expected += sum(1 for i in range(len(scores)) for j in range(i + 1, len(scores))
                        if abs(scores[i] - scores[j]) >= 1.0)
    assert len(pairs) == expected > 100
    for p in pairs:
        sa, sb = by_response[(p.instruction, p.response_a)], by_response[(p.instruction, p.response_b)]
        assert abs(sa - sb) >= 1.0 and p.preference == float(sa > sb) and p.rubric.startswith("[")
    assert sum(p.preference for p in pairs) == math.ceil(len(pairs) / 2)  # positions alternate
    assert len(pairs_from_absolute(exs, min_gap=2.5)) < len(pairs)
