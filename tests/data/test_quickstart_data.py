"""The committed quickstart sample (data/quickstart/) and `tract-dist data convert`, which reproduces it.

With the full benchmark file beside the checkout, re-converting records 0-15 must give the committed bytes,
and the sample must read back, field by field, as the examples the prometheus-eval reader gives for those
records (so the quickstart trains and evaluates on exactly what it read from the full file before). Without
it, the sample is still checked against its own contract and the converter against hand-built files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tract_dist.cli import main
from tract_dist.data.formats import read_examples
from tract_dist.data.prompts import normalize_feedback, render_prompt
from tract_dist.data.schema import JSONL_FIELDS

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DIR = REPO / "data" / "quickstart"
# The conversion as data/quickstart/NOTICE documents it (the test below checks the NOTICE says exactly this).
CONVERT_ARGS = ["--format", "prometheus-eval", "--offset", "0", "--max-examples", "16",
                "--output", "data/quickstart/vicuna_eval_0-15.jsonl"]
SOURCE_SHA256 = "131550a5815f75014a3ea71b0f534fb7ef0ca49b714c4e66935c35fdee1daacc"


def _convert(src: Path, out: Path, capsys) -> dict:
    args = list(CONVERT_ARGS)
    args[args.index("--output") + 1] = str(out)
    capsys.readouterr()
    assert main(["data", "convert", str(src), *args, "--compact"]) == 0
    return json.loads(capsys.readouterr().out)


def test_reconverting_the_full_file_reproduces_the_committed_sample(vicuna_path, quickstart_data, tmp_path,
                                                                    capsys):
    import hashlib

    assert hashlib.sha256(vicuna_path.read_bytes()).hexdigest() == SOURCE_SHA256  # the file the NOTICE names
    summary = _convert(vicuna_path, tmp_path / "again.jsonl", capsys)
    assert summary["written"] == 16 and summary["invalid"] == 0
    assert (summary["first_id"], summary["last_id"]) == ("0", "15")
    assert (tmp_path / "again.jsonl").read_bytes() == quickstart_data.read_bytes()


@pytest.mark.parametrize("require_feedback", [True, False], ids=["training", "evaluation"])
def test_sample_reads_back_as_the_benchmark_reader_gives(vicuna_path, quickstart_data, require_feedback):
    want = read_examples(str(vicuna_path), "prometheus-eval", limit=16, require_feedback=require_feedback)
    got = read_examples(str(quickstart_data), "jsonl", require_feedback=require_feedback)
    assert got.records == 16 and not got.invalid
    for a, b in zip(got.examples, want.examples, strict=True):
        for name in JSONL_FIELDS:
            assert getattr(a, name) == getattr(b, name), (a.id, name)
    # The quickstart's two slices, read with the same arguments the pipeline uses, are the same examples.
    for offset in (0, 8):
        old = read_examples(str(vicuna_path), "prometheus-eval", limit=8, offset=offset, require_feedback=False)
        new = read_examples(str(quickstart_data), "jsonl", limit=8, offset=offset, require_feedback=False)
        assert new.examples == old.examples and len(new.examples) == 8


def test_sample_against_the_raw_records(vicuna_path, quickstart_examples):
    """Independent of the readers: labels are the mean of gpt4_score, the CoT is the first gpt4_feedback, the
    prompt re-renders byte for byte, and each id is the record's index in the source file."""
    raw = json.loads(vicuna_path.read_text(encoding="utf-8"))[:16]
    assert [e.id for e in quickstart_examples] == [str(i) for i in range(16)]
    np.testing.assert_array_equal([e.score for e in quickstart_examples],
                                  [np.mean(np.asarray(r["gpt4_score"], dtype=np.float64)) for r in raw])
    for e, r in zip(quickstart_examples, raw):
        assert render_prompt(e) == r["instruction"]
        assert e.feedback == r["gpt4_feedback"][0].strip() and e.category == r["category"]


def test_sample_contract_without_the_full_file(quickstart_data, quickstart_examples):
    """What the quickstart and the tests rely on, checked in any clone: 16 records in the project's JSONL
    (every field, nothing else), ids 0..15, records 0-7 trainable (feedback present), small."""
    lines = quickstart_data.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 16 and quickstart_data.stat().st_size < 200_000
    assert all(list(json.loads(x)) == JSONL_FIELDS for x in lines)
    assert [e.id for e in quickstart_examples] == [str(i) for i in range(16)]
    train = read_examples(str(quickstart_data), "jsonl", limit=8)  # training requires feedback
    assert len(train.examples) == 8 and all(e.feedback == normalize_feedback(e.feedback) for e in train.examples)
    assert all(1 <= e.score <= 5 for e in quickstart_examples)


def test_notice_names_licence_source_range_and_the_command():
    notice = (SAMPLE_DIR / "NOTICE").read_text(encoding="utf-8")
    for needle in ("https://github.com/prometheus-eval/prometheus-eval", "eval/benchmark/data/vicuna_eval.json",
                   "Records: 0-15", SOURCE_SHA256, "Apache License, Version 2.0", "LICENSE-2.0.txt",
                   "tract-dist data convert"):
        assert needle in notice, needle
    assert " ".join(CONVERT_ARGS) in " ".join(notice.split())  # the documented command is the tested one
    assert (SAMPLE_DIR / "LICENSE-2.0.txt").read_text(encoding="utf-8").lstrip().startswith(
        "Apache License\n                           Version 2.0, January 2004")


def test_no_full_benchmark_file_is_committed():
    """The full sets come from ../shared/data (TRACT_SHARED_DATA); only small samples may be committed."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: no index to inspect")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    paths = [p for p in tracked.decode().split("\0") if p]
    assert not [p for p in paths if Path(p).name in ("vicuna_eval.json", "mt_bench_eval.json",
                                                     "feedback_collection.json")]
    big = [p for p in paths if p.startswith("data/") and (REPO / p).is_file() and (REPO / p).stat().st_size > 1 << 20]
    assert not big, f"data files over 1 MiB are committed: {big}"


# ---- the converter on hand-built files (no shared data needed) ------------------------------------------------

def _prometheus_records(examples, scores):
    return [{"idx": i, "instruction": render_prompt(e), "gpt4_score": s, "gpt4_feedback": [f"{e.feedback} [RESULT] 4"],
             "category": "demo"} for i, (e, s) in enumerate(zip(examples, scores))]


def test_convert_round_trips_a_prometheus_eval_file(quickstart_examples, tmp_path, capsys):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(_prometheus_records(quickstart_examples[:4], [[5, 4, 4], [1], [2, 3], [5, 5, 5]])))
    out = tmp_path / "out" / "bench.jsonl"
    capsys.readouterr()
    assert main(["data", "convert", str(src), "--format", "prometheus-eval", "--offset", "1", "--max-examples", "2",
                 "-o", str(out), "--compact"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 2 and (summary["first_id"], summary["last_id"]) == ("1", "2")
    back = read_examples(str(out), "jsonl").examples
    assert [e.id for e in back] == ["1", "2"] and [e.score for e in back] == [1.0, 2.5]
    for b, e in zip(back, quickstart_examples[1:3]):
        assert (b.instruction, b.response, b.reference_answer, b.criteria, b.score_descriptions, b.feedback) == \
            (e.instruction, e.response, e.reference_answer, e.criteria, e.score_descriptions, e.feedback)
        assert b.category == "demo"


def test_convert_bad_input_exits_2_naming_file_record_and_field(quickstart_examples, tmp_path, capsys):
    recs = _prometheus_records(quickstart_examples[:3], [[4], [4], [4]])
    recs[1]["gpt4_score"] = [4, "high"]
    src = tmp_path / "bad.json"
    src.write_text(json.dumps(recs))
    out = tmp_path / "out.jsonl"
    capsys.readouterr()
    assert main(["data", "convert", str(src), "--format", "prometheus-eval", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.json, record 1, field 'gpt4_score': not a number: 'high'" in err and not out.exists()
    assert main(["data", "convert", str(src), "--format", "prometheus-eval", "-o", str(out), "--skip-invalid",
                 "--compact"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 2 and summary["invalid_records"][0]["index"] == 1
    assert [e.id for e in read_examples(str(out), "jsonl").examples] == ["0", "2"]
    # Refusals: overwriting the input, an empty range, a missing file.
    assert main(["data", "convert", str(out), "--format", "jsonl", "-o", str(out)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert main(["data", "convert", str(src), "--format", "prometheus-eval", "--offset", "5", "-o",
                 str(tmp_path / "none.jsonl")]) == 2
    assert "nothing written" in capsys.readouterr().err and not (tmp_path / "none.jsonl").exists()
    assert main(["data", "convert", str(tmp_path / "absent.json"), "--format", "jsonl", "-o", str(out)]) == 2
    assert "absent.json: file not found" in capsys.readouterr().err
