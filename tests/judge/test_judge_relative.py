"""Relative grading at inference (#29 item 2): ``PairJudge`` reads p(A) = p("A") / (p("A") + p("B")) at the
verdict position, checked against an independent float64 softmax over the full vocabulary of one forward of the
prompt + feedback + " [RESULT]" written out by hand; the swapped order; decode; the judge CLI (exit 2 on bad input)."""

from __future__ import annotations

import json

import pytest
import torch

from tract_dist.cli import main
from tract_dist.data.pair_formats import pairs_from_absolute
from tract_dist.data.relative import REL_SYSTEM_PROMPT, render_relative_prompt
from tract_dist.judge import Judge
from tract_dist.judge.relative import PairJudge, debiased
from tract_dist.runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def pair_judge(tiny_export):
    from transformers import AutoModelForCausalLM

    from tract_dist.models.loading import load_tokenizer_for

    model = AutoModelForCausalLM.from_pretrained(tiny_export, dtype=torch.float64, attn_implementation="sdpa")
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, stop=("So the overall", "[RESULT]"))
    return PairJudge(Judge(model, load_tokenizer_for(tiny_export), max_length=4096, sampling=sampling, batch_size=4))


@pytest.fixture(scope="module")
def pairs(quickstart_examples):
    made = pairs_from_absolute(quickstart_examples, min_gap=0.5)
    if len(made) < 2:  # the quickstart sample has one response per instruction: pair two of them by hand
        from tract_dist.data.relative import PairExample

        a, b = quickstart_examples[0], quickstart_examples[1]
        made = [PairExample(id=f"q{i}", instruction=a.instruction, response_a=x.response, response_b=y.response,
                            rubric=f"[{a.criteria}]", preference=p, reference_answer=a.reference_answer)
                for i, (x, y, p) in enumerate(((a, b, 1.0), (b, a, 0.0)))]
    return made[:2]


def _p_a_independent(judge: PairJudge, pair, cot: str | None) -> float:
    """p(A) from one float64 forward of the chat-templated prompt + "{cot} [RESULT]", tokenised here."""
    tok = judge.tokenizer
    text = tok.apply_chat_template([{"role": "system", "content": REL_SYSTEM_PROMPT},
                                    {"role": "user", "content": render_relative_prompt(pair)}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    ids += tok.encode(f"{cot} [RESULT] A" if cot else "[RESULT] A", add_special_tokens=False)[:-1]
    a, b = tok.encode(" A", add_special_tokens=False)[-1], tok.encode(" B", add_special_tokens=False)[-1]
    with torch.no_grad():
        logits = judge.judge.model(torch.tensor([ids])).logits[0, -1].to(torch.float64)
    p = torch.softmax(logits, -1)
    return float(p[a] / (p[a] + p[b]))


def test_p_a_is_the_renormalised_verdict_probability(pair_judge, pairs):
    rail = pair_judge.grade_batch(pairs, mode="rail", swap=True)
    for pair, r in zip(pairs, rail):
        assert r.failure is None and r.p_a == pytest.approx(_p_a_independent(pair_judge, pair, None), rel=1e-9)
        assert r.swapped.p_a == pytest.approx(_p_a_independent(pair_judge, pair.swapped(), None), rel=1e-9)
        assert r.verdict == ("A" if r.p_a > 0.5 else "B") and 0 < r.mass < 1
        assert debiased(r) == pytest.approx((r.p_a + 1 - r.swapped.p_a) / 2)
    cot = pair_judge.grade_batch(pairs[:1], n_cots=2, mode="cot_rail")[0]
    assert len(cot.cots) == 2 and cot.failure is None
    want = [_p_a_independent(pair_judge, pairs[0], c) for c in cot.cots]
    assert cot.per_cot == pytest.approx(want, rel=1e-9) and cot.p_a == pytest.approx(sum(want) / 2, rel=1e-9)
    dec = pair_judge.grade(pairs[0], mode="decode")  # a random tiny model writes no verdict: counted, not guessed
    assert dec.p_a is None and dec.unparseable == 1 and dec.failure.startswith("unparseable")


def test_pair_inputs_are_checked(pair_judge):
    with pytest.raises(ValueError, match="missing field.*response_b"):
        pair_judge.grade({"instruction": "i", "response_a": "a", "rubric": "r"})
    with pytest.raises(ValueError, match="outside"):
        pair_judge.grade({"instruction": "i", "response_a": "a", "response_b": "b", "rubric": "r", "preference": 2})


def test_judge_cli_relative(tiny_export, pairs, tmp_path, capsys):
    base = ["judge", "--model", tiny_export, "--task", "relative", "--mode", "rail", "tracking.enabled=false",
            "data.max_length=4096"]
    p = pairs[0]
    assert main(base + ["--instruction", p.instruction, "--response-a", p.response_a, "--response-b", p.response_b,
                        "--rubric", p.rubric, "--swap"] + (["--reference-answer", p.reference_answer]
                                                           if p.reference_answer else [])) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["verdict"] in ("A", "B") and row["swapped"]["p_a"] is not None
    assert row["p_a_debiased"] == pytest.approx((row["p_a"] + 1 - row["swapped"]["p_a"]) / 2)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(x.to_dict()) + "\n" for x in pairs))
    assert main(base + ["--file", str(path), "--format", "pairs-jsonl", "--output", str(tmp_path / "o.jsonl")]) == 0
    got = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [g["id"] for g in got] == [x.id for x in pairs] and got[0]["p_a"] == pytest.approx(row["p_a"], rel=1e-5)
    path.write_text(json.dumps({"instruction": "i", "response_a": "a", "rubric": "r"}) + "\n")
    assert main(base + ["--file", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "record 0" in err and "response_b" in err
    assert main(base + ["--instruction", "i", "--response", "x"]) == 2  # an absolute flag on a relative task
    assert main(["judge", "--model", tiny_export, "--response-a", "a", "tracking.enabled=false"]) == 2
