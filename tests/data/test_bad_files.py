"""Hand-made bad inputs give errors naming file, record and field, or counts when skipping."""

import json

import pytest

from tract_dist.cli import main
from tract_dist.data.formats import read_examples
from tract_dist.data.prompts import render_prompt
from tract_dist.data.schema import DataError


def _fc_record(**over):
    rec = {"orig_instruction": "Say hi.", "orig_response": "Hi!", "orig_reference_answer": "Hello!",
           "orig_criteria": "Is it friendly?", "output": "Friendly and short. [RESULT] 4", "orig_score": 4}
    rec.update({f"orig_score{k}_description": f"level {k}" for k in range(1, 6)})
    rec.update(over)
    return rec


def _write_json(path, records):
    path.write_text(json.dumps(records))
    return str(path)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_good_feedback_collection(tmp_path):
    p = _write_jsonl(tmp_path / "fc.jsonl", [_fc_record(), _fc_record(orig_score="2", output="Meh. So the overall score is 2")])
    r = read_examples(p, "feedback-collection")
    assert [e.score for e in r.examples] == [4.0, 2.0]
    assert [e.feedback for e in r.examples] == ["Friendly and short.", "Meh."]
    assert r.examples[0].reference_answer == "Hello!"


def test_truncated_json_names_the_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text(json.dumps([_fc_record(), _fc_record()])[:-40])
    with pytest.raises(DataError, match=r"broken\.json, record 1: cannot be parsed as a JSON array.*truncated"):
        read_examples(str(p), "feedback-collection")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.json: file not found"):
        read_examples(str(tmp_path / "nope.json"), "jsonl")


@pytest.mark.parametrize("bad,field,msg", [
    ({"orig_criteria": None}, "orig_criteria", "missing"),
    ({"orig_score": 7}, "orig_score", "outside the scale 1..5"),
    ({"output": "[RESULT] 3"}, "output", "empty feedback"),
    ({"orig_response": "   "}, "orig_response", "empty"),
    ({"orig_score": 2.5}, "orig_score", "not an integer"),
])
def test_bad_record_names_index_and_field(tmp_path, bad, field, msg):
    p = _write_jsonl(tmp_path / "bad.jsonl", [_fc_record(), _fc_record(), _fc_record(**bad)])
    with pytest.raises(DataError) as ei:
        read_examples(p, "feedback-collection")
    assert ei.value.index == 2 and ei.value.field == field
    assert f"bad.jsonl, record 2, field '{field}': " in str(ei.value) and msg in str(ei.value)
    r = read_examples(p, "feedback-collection", skip_invalid=True)
    assert r.records == 3 and len(r.examples) == 2 and [(x.index, x.field) for x in r.invalid] == [(2, field)]


def test_missing_key_in_some_records(tmp_path):
    rec = _fc_record()
    del rec["orig_instruction"]
    p = _write_jsonl(tmp_path / "m.jsonl", [_fc_record(), rec])
    with pytest.raises(DataError, match=r"record 1, field 'orig_instruction': missing"):
        read_examples(p, "feedback-collection")


def test_prometheus_eval_bad_score_list(tmp_path, quickstart_examples):
    # Real Vicuna Bench records in prometheus-eval's layout: the committed sample's prompts re-rendered (they
    # round-trip byte for byte, tests/data/test_quickstart_data.py).
    recs = [{"instruction": render_prompt(e), "gpt4_score": [4, 4, 4], "gpt4_feedback": [e.feedback]}
            for e in quickstart_examples[:3]]
    read_examples(_write_json(tmp_path / "ok.json", recs), "prometheus-eval")  # valid before the damage
    recs[1]["gpt4_score"] = []
    p = tmp_path / "pe.json"
    p.write_text(json.dumps(recs))
    with pytest.raises(DataError, match=r"record 1, field 'gpt4_score'"):
        read_examples(str(p), "prometheus-eval")


def test_duplicate_ids_in_jsonl(tmp_path):
    rec = {"id": "x", "instruction": "i", "response": "r", "criteria": "c", "feedback": "f", "score": 3,
           "score_descriptions": ["a", "b", "c", "d", "e"]}
    p = _write_jsonl(tmp_path / "d.jsonl", [rec, rec])
    with pytest.raises(DataError, match=r"record 1, field 'id': duplicate id 'x'"):
        read_examples(p, "jsonl")


@pytest.mark.parametrize("weight, msg", [("2", "expected a number, got str"), (True, "expected a number, got bool"),
                                         (float("nan"), "not a finite number")])
def test_bad_training_weight_names_its_field(tmp_path, weight, msg):
    """The optional per-record training weight (stage-2 selection, #24): a finite number, signed allowed."""
    rec = {"id": "x", "instruction": "i", "response": "r", "criteria": "c", "feedback": "f", "score": 3,
           "score_descriptions": ["a", "b", "c", "d", "e"]}
    good = read_examples(_write_jsonl(tmp_path / "g.jsonl", [{**rec, "weight": -0.5}, {**rec, "id": "y"}]), "jsonl")
    assert [e.weight for e in good.examples] == [-0.5, None]
    assert "weight" not in good.examples[1].to_dict()  # unweighted records keep the schema they always had
    p = _write_jsonl(tmp_path / "w.jsonl", [rec, {**rec, "id": "y", "weight": weight}])
    with pytest.raises(DataError, match=rf"record 1, field 'weight': {msg}"):
        read_examples(p, "jsonl")


def test_cli_inspect_counts_and_errors(tmp_path, capsys):
    long = _fc_record(orig_response="word " * 3000)
    p = _write_jsonl(tmp_path / "mix.jsonl", [_fc_record(), _fc_record(orig_score=7), long, _fc_record(output="")])
    assert main(["data", "inspect", p, "--format", "feedback-collection", "--tokenizer", "llama3"]) == 2
    assert "mix.jsonl, record 1, field 'orig_score'" in capsys.readouterr().err

    rc = main(["data", "inspect", p, "--format", "feedback-collection", "--tokenizer", "llama3",
               "--max-length", "512", "--skip-invalid", "--compact"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["records"], out["valid"], out["invalid"], out["truncated"], out["dropped"]) == (4, 2, 2, 1, 0)
    assert out["score_token_ids"] == [16, 17, 18, 19, 20] and out["label_mean"] == 4.0

    rc = main(["data", "inspect", p, "--format", "feedback-collection", "--tokenizer", "llama3",
               "--max-length", "512", "--skip-invalid", "--truncation", "drop", "--compact"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and (out["truncated"], out["dropped"], out["drop_reasons"]) == (0, 1, {"too_long": 1})

    assert main(["data", "inspect", str(tmp_path / "absent.json"), "--format", "jsonl", "--tokenizer", "llama3"]) == 2
    assert "absent.json: file not found" in capsys.readouterr().err


def test_offset_and_limit_keep_file_positions(tmp_path):
    recs = [_fc_record(orig_score=1 + i % 5) for i in range(6)]
    recs[4]["orig_score"] = 9
    p = _write_jsonl(tmp_path / "o.jsonl", recs)
    r = read_examples(p, "feedback-collection", offset=2, limit=3, skip_invalid=True)
    assert r.records == 3 and [e.id for e in r.examples] == ["2", "3"] and r.invalid[0].index == 4


@pytest.mark.parametrize("feedback,msg", [
    ([3, 4], "expected a list of strings, got a list holding int"),
    (["fine", 2.5], "expected a list of strings, got a list holding float"),
    ([["nested"]], "expected a list of strings, got a list holding list"),
    (4, "expected a string or a list of strings, got int"),
    ({"text": "x"}, "expected a string or a list of strings, got dict"),
])
def test_prometheus_eval_feedback_of_another_type_is_named(tmp_path, quickstart_examples, feedback, msg):
    """gpt4_feedback holding numbers reached normalize_feedback and ended in a TypeError (issue #23)."""
    recs = [{"instruction": render_prompt(e), "gpt4_score": [4], "gpt4_feedback": [e.feedback]}
            for e in quickstart_examples[:2]]
    recs[1]["gpt4_feedback"] = feedback
    p = _write_json(tmp_path / "pe.json", recs)
    for need_feedback in (True, False):  # an evaluation set (feedback optional) is checked the same way
        with pytest.raises(DataError) as ei:
            read_examples(p, "prometheus-eval", require_feedback=need_feedback)
        assert (ei.value.index, ei.value.field) == (1, "gpt4_feedback") and msg in str(ei.value)
    r = read_examples(p, "prometheus-eval", skip_invalid=True)
    assert len(r.examples) == 1 and [(x.index, x.field) for x in r.invalid] == [(1, "gpt4_feedback")]


@pytest.mark.parametrize("key,value,msg", [
    ("id", [1], "expected a string or an integer, got list"),
    ("id", True, "expected a string or an integer, got bool"),
    ("id", 1.5, "expected a string or an integer, got float"),
    ("id", " ", "empty"),
    ("category", 3, "expected a string, got int"),
])
def test_ids_and_categories_of_another_type_are_named(tmp_path, key, value, msg):
    """Siblings of the gpt4_feedback bug in the readers: a field of another type was turned into a string no one
    wrote (an id "[1]") or dropped without a word (a category 3: the record left its category's metrics)."""
    rec = {"id": "a", "instruction": "i", "response": "r", "criteria": "c", "feedback": "f", "score": 3,
           "score_descriptions": ["a", "b", "c", "d", "e"]}
    p = _write_jsonl(tmp_path / "t.jsonl", [rec, {**rec, "id": "b", key: value}])
    with pytest.raises(DataError) as ei:
        read_examples(p, "jsonl")
    assert (ei.value.index, ei.value.field) == (1, key) and msg in str(ei.value)
    assert read_examples(p, "jsonl", skip_invalid=True).examples[0].id == "a"
