"""Multi-token score values at inference (#29): on 1-10, where "10" is two tokens for SmolLM2's and Mistral's
tokenizers, the judge's ŷ equals Σ_v v·p(v) with p(v) computed independently, in float64, by teacher-forcing each
value's tokens (and the EOS that ends "1" before "10") after the scoring sequence, one full forward per value."""

from __future__ import annotations

import pytest
import torch

from tract_dist.data.encode import EncodeOptions, prompt_ids
from tract_dist.data.prompts import SCORE_PHRASE
from tract_dist.judge import Judge
from tract_dist.runtime.sampling import SamplingParams


def _judge(path: str) -> Judge:
    from transformers import AutoModelForCausalLM

    from tract_dist.models.loading import load_tokenizer_for

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa")
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=5, stop=("So the overall", "[RESULT]"))
    return Judge(model, load_tokenizer_for(path), scale="1-10", max_length=4096, sampling=sampling, batch_size=4)


def _p_values(judge: Judge, ids: list[int]) -> list[float]:
    """p(v) for v = 1..10 after ``ids``: the product of the float64 softmax at each of v's tokens, where v's
    tokens are what the tokenizer writes after the score phrase and, for "1", the EOS training appends."""
    tok = judge.tokenizer
    out = []
    for v in range(1, 11):
        cont = tok.encode(f"{SCORE_PHRASE} {v}", add_special_tokens=False)[len(tok.encode(
            f"{SCORE_PHRASE} 5", add_special_tokens=False)) - 1:]
        if v == 1:
            cont = cont + [tok.eos_token_id]
        with torch.no_grad():  # logits of the positions that predict cont (the last len(cont) + 1 but the final)
            logits = judge.model(torch.tensor([ids + cont]), logits_to_keep=len(cont) + 1).logits[0, :-1]
        logp = torch.log_softmax(logits.to(torch.float64), -1)
        out.append(float(sum(logp[i, t] for i, t in enumerate(cont)).exp()))
    return out


def _independent_sequence(judge: Judge, ex, cot: str | None) -> list[int]:
    tok = judge.tokenizer
    tail = tok.encode(f"{cot} {SCORE_PHRASE} 5" if cot else f"{SCORE_PHRASE} 5", add_special_tokens=False)[:-1]
    return prompt_ids(tok, ex, EncodeOptions(scale=(1, 10))) + tail


def _check(judge: Judge, exs, results, cot: bool) -> None:
    for ex, res in zip(exs, results):
        assert res.failure is None
        refs = [_p_values(judge, _independent_sequence(judge, ex, c if cot else None)) for c in (res.cots or [None])]
        yhats = [sum(v * p for v, p in zip(range(1, 11), ps)) for ps in refs]
        assert res.per_cot == pytest.approx(yhats, rel=1e-9, abs=1e-12)
        mean_p = [sum(ps[k] for ps in refs) / len(refs) for k in range(10)]
        assert [res.distribution[k] for k in range(1, 11)] == pytest.approx(mean_p, rel=1e-9, abs=1e-15)


def test_smollm2_1_to_10_cot_rail_and_rail(tiny_export, quickstart_examples):
    """cot_rail reads out on the CoT's cached prompt keys/values; rail reads a left-padded batch: both compute
    every trie node of a sequence in one forward (tree mask) and equal the per-value forwards."""
    judge = _judge(tiny_export)
    assert not judge.score_scale.single_token and judge.score_tokens is None
    exs = quickstart_examples[:2]
    _check(judge, exs[:1], judge.score_batch(exs[:1], n_cots=2, mode="cot_rail"), cot=True)
    _check(judge, exs, judge.score_batch(exs, mode="rail"), cot=False)


def test_mistral_1_to_10_rail(tmp_path, quickstart_examples):
    from tract_dist.generate.tiny_export import save_tiny_export

    judge = _judge(str(save_tiny_export(tmp_path / "m", "mistral")))
    assert [len(s) for s in judge.score_scale.sequences] == [2] + [1] * 8 + [2]  # "1"+EOS ... "1","0"
    exs = quickstart_examples[:2]
    _check(judge, exs, judge.score_batch(exs, mode="rail"), cot=False)
