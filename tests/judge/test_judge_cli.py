"""``tract-dist judge`` on one input (flags, JSON) and on a file."""

from __future__ import annotations

import json

from tract_dist.cli import main
from tract_dist.data.formats import write_jsonl


def _flags(ex):
    args = ["--instruction", ex.instruction, "--response", ex.response, "--criteria", ex.criteria]
    for d in ex.score_descriptions:
        args += ["--score-description", d]
    return args


def test_judge_single_input_flags_and_json(tiny_export, quickstart_examples, capsys, tmp_path):
    ex = quickstart_examples[0]
    base = ["judge", "--model", tiny_export, "--mode", "rail", "tracking.enabled=false", "data.max_length=4096"]
    assert main(base + _flags(ex)) == 0
    by_flags = json.loads(capsys.readouterr().out)
    payload = json.dumps({"instruction": ex.instruction, "response": ex.response, "criteria": ex.criteria,
                          "score_descriptions": ex.score_descriptions})
    assert main(base + ["--json", payload]) == 0
    by_json = json.loads(capsys.readouterr().out)
    assert by_flags["score"] == by_json["score"] and by_flags["mode"] == "rail"
    assert set(by_flags["distribution"]) == {"1", "2", "3", "4", "5"}


def test_judge_file_to_output(tiny_export, quickstart_examples, tmp_path):
    write_jsonl(quickstart_examples[:3], tmp_path / "in.jsonl")
    rc = main(["judge", "--model", tiny_export, "--file", str(tmp_path / "in.jsonl"), "--output",
               str(tmp_path / "out.jsonl"), "--n-cots", "1", "generation.max_new_tokens=4", "data.max_length=4096"])
    assert rc == 0
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [e.id for e in quickstart_examples[:3]]
    assert all(x["mode"] == "cot_rail" and len(x["cots"]) == 1 and x["score"] is not None for x in lines)


def test_judge_usage_errors(tiny_export, capsys):
    assert main(["judge", "--model", tiny_export, "--instruction", "x", "--response", "y"]) == 2
    assert "score-description" in capsys.readouterr().err
    assert main(["judge", "--model", tiny_export, "--json", "{not json"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_library_usage_errors_exit_2_under_python_dash_m(tmp_path):
    """``python -m tract_dist.cli`` (how the quickstart runs) loads cli.py twice; a UsageError raised by library
    code must still be a message and exit 2, not a traceback."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "tract_dist.cli", "judge", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "give exactly one of --file, --json" in r.stderr and "Traceback" not in r.stderr
