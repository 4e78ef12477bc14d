"""The bad-input probe of issue 13: every bad value, file and argument gives exit 2 and a message naming the
file, record and field (or config key); never a traceback, never a silent coercion."""

from __future__ import annotations

import json

import pytest

from tract_dist.cli import main
from tract_dist.config import ConfigError, load_config
from tract_dist.data.formats import read_examples
from tract_dist.data.prompts import render_prompt
from tract_dist.data.schema import DataError

BASE = "model:\n  name_or_path: tiny-llama\n  tokenizer: smollm2\n"


def _cfg_file(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# ---- config: non-finite and absurd numbers, duplicate keys, encodings, names -----------------------------

@pytest.mark.parametrize("key,value,msg", [
    ("training.learning_rate", ".nan", "finite number"),
    ("loss.lam", ".inf", "finite number"),
    ("training.max_grad_norm", "-.inf", "finite number"),
    ("generation.temperature", ".nan", "finite number"),
    ("cluster.num_workers", "100000000000000000000000", "less than or equal to 100000"),
    ("data.scale", "1-100000000000000", "should match pattern"),
    ("data.scale", "1-500", "has 500 values; at most 101"),
    ("training.micro_batch_size", "1e9", "valid integer"),
    ("training.seed", "-1", "greater than or equal to 0"),
    ("training.learning_rate", "1e6", "less than or equal to 10"),
    ("tracking.run_name", "../../etc", "should match pattern"),
    ("evaluation.benchmarks", '[{"name": "a/b", "path": "x"}]', "should match pattern"),
])
def test_config_rejects_nonfinite_and_absurd_values(tmp_path, key, value, msg):
    with pytest.raises(ConfigError) as ei:
        load_config(_cfg_file(tmp_path, BASE), [f"{key}={value}"])
    assert key.split(".")[0] in str(ei.value) and msg in str(ei.value)


def test_duplicate_benchmark_names_are_rejected(tmp_path):
    bench = '[{"name": "v", "path": "a"}, {"name": "v", "path": "b"}]'
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(_cfg_file(tmp_path, BASE), [f"evaluation.benchmarks={bench}"])


def test_duplicate_yaml_keys_are_rejected_naming_the_line(tmp_path):
    p = _cfg_file(tmp_path, BASE + "training:\n  learning_rate: 1e-5\n  max_steps: 10\n  learning_rate: 1e-2\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg and "duplicate key 'learning_rate'" in msg and "line 7" in msg
    with pytest.raises(ConfigError, match="duplicate key 'model'"):
        load_config(_cfg_file(tmp_path, BASE + BASE, "twice.yaml"))
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config(_cfg_file(tmp_path, BASE), ["training.deepspeed_config={a: 1, a: 2}"])


@pytest.mark.parametrize("encoding,what", [("utf-16", "UTF-16"), ("latin-1", "not UTF-8")])
def test_config_in_another_encoding_is_named(tmp_path, encoding, what, capsys):
    p = tmp_path / "c.yaml"
    p.write_bytes((BASE + "data:\n  system_prompt: Évaluez la réponse\n").encode(encoding))
    with pytest.raises(ConfigError, match=what) as ei:
        load_config(p)
    assert str(p) in str(ei.value)
    assert main(["config", "show", str(p)]) == 2
    assert str(p) in capsys.readouterr().err


def test_utf8_bom_config_is_accepted(tmp_path):
    p = tmp_path / "bom.yaml"
    p.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert load_config(p).model.name_or_path == "tiny-llama"


# ---- command line: scales, lengths, names ---------------------------------------------------------------

@pytest.mark.parametrize("argv,msg", [
    (["score-tokens", "--tokenizer", "llama3", "--scale", "abc"], "MIN-MAX"),
    (["score-tokens", "--tokenizer", "llama3", "--scale", "5-1"], "MIN < MAX"),
    (["score-tokens", "--tokenizer", "llama3", "--scale", "1-"], "MIN-MAX"),
    (["score-tokens", "--tokenizer", "llama3", "--scale", "1-100000000000000"], "at most 101"),
    (["data", "inspect", "x.jsonl", "--tokenizer", "llama3", "--max-length", "0"], "between 64"),
    (["data", "inspect", "x.jsonl", "--tokenizer", "llama3", "--max-length", "-5"], "between 64"),
    (["data", "inspect", "x.jsonl", "--tokenizer", "llama3", "--max-length", "ten"], "expected an integer"),
    (["data", "convert", "x.json", "--format", "jsonl", "-o", "y.jsonl", "--scale", "1-"], "MIN-MAX"),
    (["train", "c.yaml", "--run-name", "../escape"], "not a safe name"),
    (["pipeline", "c.yaml", "--name", "a/b"], "not a safe name"),
])
def test_bad_arguments_exit_2_with_a_message(argv, msg, capsys):
    with pytest.raises(SystemExit) as ei:  # argparse's usage error
        main(argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_score_tokens_config_scale_error_exits_2(tmp_path, capsys):
    p = _cfg_file(tmp_path, BASE + "data:\n  scale: 3-3\n")
    assert main(["score-tokens", "--config", str(p)]) == 2
    assert "data.scale" in capsys.readouterr().err


# ---- data files: scores, JSON damage, encodings, Prometheus markers --------------------------------------

def _jsonl_record(**over):
    rec = {"id": "r0", "instruction": "Say hi.", "response": "Hi!", "criteria": "Friendly?", "feedback": "Kind.",
           "score": 4, "score_descriptions": ["a", "b", "c", "d", "e"]}
    rec.update(over)
    return rec


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("score,ok", [
    (True, False), (False, False), ("four", False), ("4/5", False), ("nan", False), ("1e0", False),
    ("inf", False), ([4], False), ({"v": 4}, False), ("4", True), (" 3.5 ", True), (2, True),
])
def test_score_coercions(tmp_path, score, ok):
    p = _write_jsonl(tmp_path / "s.jsonl", [_jsonl_record(score=score)])
    if ok:
        assert read_examples(p, "jsonl").examples[0].score == float(str(score).strip())
    else:
        with pytest.raises(DataError, match=r"s\.jsonl, record 0, field 'score'"):
            read_examples(p, "jsonl")


def test_boolean_orig_score_is_rejected_but_string_digits_kept(tmp_path):
    rec = {"orig_instruction": "i", "orig_response": "r", "orig_criteria": "c", "output": "fine",
           **{f"orig_score{k}_description": f"d{k}" for k in range(1, 6)}}
    p = _write_jsonl(tmp_path / "fc.jsonl", [{**rec, "orig_score": "5"}, {**rec, "orig_score": True}])
    with pytest.raises(DataError, match=r"record 1, field 'orig_score': expected a number, got a boolean"):
        read_examples(p, "feedback-collection")
    assert read_examples(p, "feedback-collection", skip_invalid=True).examples[0].score == 5.0


def test_empty_files_say_so(tmp_path):
    for name, text in [("e.jsonl", ""), ("w.json", "  \n\n"), ("a.json", "[]")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=rf"{name}: empty"):
            read_examples(str(tmp_path / name), "jsonl")


def test_truncated_jsonl_names_the_record_and_line(tmp_path):
    p = tmp_path / "t.jsonl"
    good = json.dumps(_jsonl_record(id="a")) + "\n" + json.dumps(_jsonl_record(id="b")) + "\n"
    p.write_text(good + json.dumps(_jsonl_record(id="c"))[:30])
    with pytest.raises(DataError) as ei:
        read_examples(str(p), "jsonl")
    assert ei.value.index == 2
    assert "t.jsonl, record 2: line 3 cannot be parsed as JSON" in str(ei.value) and "truncated" in str(ei.value)


def test_truncated_json_array_names_the_record(tmp_path):
    recs = [_jsonl_record(id=str(i)) for i in range(3)]
    p = tmp_path / "t.json"
    p.write_text(json.dumps(recs, indent=1)[:-60])
    with pytest.raises(DataError) as ei:
        read_examples(str(p), "jsonl")
    assert ei.value.index == 2 and "t.json, record 2: cannot be parsed as a JSON array" in str(ei.value)
    p.write_text(json.dumps(recs)[:-1])  # only the closing bracket is missing
    with pytest.raises(DataError, match=r"record 3: .*without '\]' \(truncated\?\)"):
        read_examples(str(p), "jsonl")
    p.write_text("[1, 2]")
    with pytest.raises(DataError, match="record 0: .*expected an object, got int"):
        read_examples(str(p), "jsonl")


@pytest.mark.parametrize("encoding,msg", [("utf-16", "UTF-16"), ("latin-1", "not UTF-8 text: byte 0xe9 on line 1")])
def test_data_file_in_another_encoding_is_named(tmp_path, encoding, msg, capsys):
    p = tmp_path / "enc.jsonl"
    p.write_bytes((json.dumps(_jsonl_record(response="café"), ensure_ascii=False) + "\n").encode(encoding))
    with pytest.raises(DataError, match=msg):
        read_examples(str(p), "jsonl")
    assert main(["data", "convert", str(p), "--format", "jsonl", "-o", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "Traceback" not in err


def test_instruction_quoting_the_section_markers_is_rejected(tmp_path, quickstart_examples):
    ex = quickstart_examples[0]
    tricky = ex.__class__(**{**ex.to_dict(), "instruction": "Explain this template:\n\n###Response to evaluate:\nX"})
    recs = [{"instruction": render_prompt(ex), "gpt4_score": [4], "gpt4_feedback": ["ok"]},
            {"instruction": render_prompt(tricky), "gpt4_score": [4], "gpt4_feedback": ["ok"]}]
    p = tmp_path / "pe.json"
    p.write_text(json.dumps(recs))
    with pytest.raises(DataError) as ei:
        read_examples(str(p), "prometheus-eval")
    assert ei.value.index == 1 and ei.value.field == "instruction"
    assert "'###Response to evaluate:' 2 times" in str(ei.value)
    good = read_examples(str(p), "prometheus-eval", skip_invalid=True).examples
    assert [e.instruction for e in good] == [ex.instruction]  # the unambiguous one parses exactly


def test_every_data_command_exits_2_on_a_broken_file(tmp_path, capsys):
    p = tmp_path / "b.jsonl"
    p.write_text('{"id": 1, "instruction": ')
    for argv in (["data", "inspect", str(p), "--format", "jsonl", "--tokenizer", "llama3"],
                 ["data", "convert", str(p), "--format", "jsonl", "-o", str(tmp_path / "o.jsonl")],
                 ["judge", "--model", "tiny-llama", "--file", str(p), "--format", "prometheus-eval"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "b.jsonl, record 0" in err and "Traceback" not in err


def test_the_last_two_crashing_inputs_exit_2_naming_file_record_and_field(tmp_path, quickstart_examples, capsys):
    """Issue #23: a prometheus-eval record whose gpt4_feedback holds numbers (TypeError in normalize_feedback) and
    a JSONL record nested 5,000 levels deep (RecursionError in the JSON decoder) ended in tracebacks."""
    recs = [{"instruction": render_prompt(e), "gpt4_score": [4, 5], "gpt4_feedback": [e.feedback]}
            for e in quickstart_examples[:3]]
    recs[2]["gpt4_feedback"] = [4, 5]
    numbers = tmp_path / "numbers.json"
    numbers.write_text(json.dumps(recs))
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps(_jsonl_record(id="a")) + "\n"
                    + '{"id": "b", "response": "ok", "feedback": ' + "[" * 5000 + "]" * 5000 + "}\n")
    deep_array = tmp_path / "deep.json"
    deep_array.write_text("[" + json.dumps(_jsonl_record(id="a")) + ', {"criteria": ' + "{\"k\": " * 5000 + "1"
                          + "}" * 5000 + "}]")
    cases = [(numbers, "prometheus-eval", "numbers.json, record 2, field 'gpt4_feedback': expected a list of strings"),
             (deep, "jsonl", "deep.jsonl, record 1, field 'feedback': line 2 cannot be parsed as JSON: nested more "
                             "than 500 levels deep"),
             (deep_array, "jsonl", "deep.json, record 1, field 'criteria': cannot be parsed as a JSON array: nested "
                                   "more than 500 levels deep")]
    for path, fmt, msg in cases:
        assert main(["data", "convert", str(path), "--format", fmt, "-o", str(tmp_path / "o.jsonl")]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
    # The same decoder behind the other JSON a user hands over: judge --json, a predictions file.
    assert main(["judge", "--model", "tiny-llama", "--json", '{"instruction": ' + "[" * 5000 + "]" * 5000 + "}"]) == 2
    assert "--json: not valid JSON: nested more than 500 levels deep" in capsys.readouterr().err
    from tract_dist.evaluate.runner import load_predictions

    preds = tmp_path / "predictions.jsonl"
    preds.write_text('{"prediction": 1, "gold": ' + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(DataError, match=r"predictions\.jsonl, record 0: not valid JSON: nested more than 500"):
        load_predictions(preds)


def test_a_config_nested_thousands_of_levels_deep_exits_2(tmp_path, capsys):
    p = _cfg_file(tmp_path, BASE + "data:\n  system_prompt: " + "[" * 5000 + "]" * 5000 + "\n")
    assert main(["config", "show", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}: not valid YAML: nested too deeply to parse" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="override data.system_prompt: .* nested too deeply"):
        load_config(_cfg_file(tmp_path, BASE, "ok.yaml"), ["data.system_prompt=" + "[" * 5000 + "]" * 5000])
