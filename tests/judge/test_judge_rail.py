"""CoT-RAIL: ŷ from the judge equals an independent float64 computation over the model's full logits."""

from __future__ import annotations

import pytest
import torch

from tract_dist.data.encode import EncodeOptions, encode_example, prompt_ids
from tract_dist.data.prompts import SCORE_PHRASE
from tract_dist.runtime.sampling import SamplingParams
from tract_dist.judge import Judge

VALUES = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)


@pytest.fixture(scope="module")
def judge64(tiny_export):
    """A float64 tiny judge (sdpa: eager attention gives NaN rows for left padding in float64, transformers 5.24)."""
    from transformers import AutoModelForCausalLM

    from tract_dist.models.loading import load_tokenizer_for

    model = AutoModelForCausalLM.from_pretrained(tiny_export, dtype=torch.float64, attn_implementation="sdpa")
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, stop=("So the overall", "[RESULT]"))
    return Judge(model, load_tokenizer_for(tiny_export), max_length=4096, sampling=sampling, batch_size=4)


def _reference_yhat(judge: Judge, ids: list[int], normalize: bool = False) -> tuple[float, torch.Tensor]:
    """Independent read-out: one unpadded forward, full logits, float64 softmax at the last position."""
    with torch.no_grad():
        logits = judge.model(torch.tensor([ids])).logits[0, -1].to(torch.float64)
    p = torch.softmax(logits, -1)[judge.score_tokens.token_ids]
    y = (p * VALUES).sum() / (p.sum() if normalize else 1.0)
    return float(y), p


def _independent_sequence(judge: Judge, ex, cot: str) -> list[int]:
    """prompt + "{cot} So the overall score is", tokenised with plain tokenizer calls (placeholder score cut)."""
    tok = judge.tokenizer
    prompt = prompt_ids(tok, ex, EncodeOptions())
    tail = tok.encode(f"{cot} {SCORE_PHRASE} 1", add_special_tokens=False)
    assert tail[-1] == judge.score_tokens.id_for(1)
    return prompt + tail[:-1]


@pytest.mark.parametrize("normalize", [False, True])
def test_cot_rail_equals_full_logit_reference(judge64, quickstart_examples, normalize):
    judge64.rail_normalize = normalize
    exs = quickstart_examples[:3]
    results = judge64.score_batch(exs, n_cots=2, mode="cot_rail")
    for ex, res in zip(exs, results):
        assert len(res.cots) == 2 and res.failure is None
        refs = [_reference_yhat(judge64, _independent_sequence(judge64, ex, c), normalize) for c in res.cots]
        assert res.per_cot == pytest.approx([r[0] for r in refs], rel=1e-9, abs=1e-12)
        assert res.score == pytest.approx(sum(r[0] for r in refs) / 2, rel=1e-9, abs=1e-12)
        mean_p = (refs[0][1] + refs[1][1]) / 2
        assert [res.distribution[k] for k in range(1, 6)] == pytest.approx(mean_p.tolist(), rel=1e-9, abs=1e-15)
    judge64.rail_normalize = False


def test_normalised_score_lies_on_the_scale(judge64, quickstart_examples):
    judge64.rail_normalize = True
    res = judge64.score(quickstart_examples[0], n_cots=1)
    judge64.rail_normalize = False
    assert 1.0 <= res.score <= 5.0


def test_scoring_tokens_match_training(judge64, quickstart_examples):
    """The judge's sequence is the training sequence up to (and excluding) the score token."""
    from dataclasses import replace

    ex = quickstart_examples[1]
    cot = judge64.score(ex, n_cots=1).cots[0]
    prompt = prompt_ids(judge64.tokenizer, ex, EncodeOptions())
    enc = encode_example(judge64.tokenizer, replace(ex, feedback=cot, score=4.0), judge64.score_tokens,
                         EncodeOptions(max_length=4096))
    assert judge64.score_sequence(prompt, cot) == enc.input_ids[:enc.score_position + 1]
    assert enc.input_ids[enc.score_position + 1] == judge64.score_tokens.id_for(4)


def test_greedy_single_cot_is_deterministic_and_sampled_cots_differ(judge64, quickstart_examples):
    a = judge64.score(quickstart_examples[0], n_cots=1)
    b = judge64.score(quickstart_examples[0], n_cots=1)
    assert a.cots == b.cots and a.score == b.score
    many = judge64.score(quickstart_examples[0], n_cots=3)
    assert len(set(many.cots)) == 3
    judge64.sample_single_cot = True  # the official inference samples its one CoT (evaluation.sample_single_cot)
    try:
        sampled = judge64.score(quickstart_examples[0], n_cots=1)
    finally:
        judge64.sample_single_cot = False
    assert sampled.cots == many.cots[:1] != a.cots  # CoT 0's own seed, as in the n = 3 run; not the greedy one


def test_rail_without_cot(judge64, quickstart_examples):
    ex = quickstart_examples[2]
    res = judge64.score(ex, mode="rail")
    assert res.cots == [] and res.failure is None
    tok = judge64.tokenizer
    phrase = tok.encode(f"{SCORE_PHRASE} 1", add_special_tokens=False)[:-1]
    ref, _ = _reference_yhat(judge64, prompt_ids(tok, ex, EncodeOptions()) + phrase)
    assert res.score == pytest.approx(ref, rel=1e-9)


def test_an_input_whose_stop_signal_fires_gets_no_score(judge64, quickstart_examples):
    """A server's deadline or cancellation (runtime/deadline.py) per input: the input's CoT stops, it gets no
    read-out and says why; the other inputs of the batch are judged as without signals (the same CoTs; ŷ to
    float64 rounding, the read-out batch being smaller)."""
    from tract_dist.runtime.deadline import StopSignal

    exs = quickstart_examples[:2]
    free = judge64.score_batch(exs, n_cots=2, mode="cot_rail")
    cancelled = StopSignal(None)
    cancelled.cancel()
    out = judge64.score_batch(exs, n_cots=2, mode="cot_rail", stops=[None, cancelled])
    assert out[0].cots == free[0].cots and out[0].score == pytest.approx(free[0].score, abs=1e-12)
    budget = judge64.sampling.max_new_tokens
    assert out[1].score is None and out[1].failure == f"cancelled: stopped after 0 of {budget} new tokens"
    rail = judge64.score_batch(exs, mode="rail", stops=[StopSignal(0.0), None])  # monotonic 0: long past
    assert rail[0].failure == "deadline: stopped before the read-out" and rail[0].score is None
    assert rail[1].score == pytest.approx(judge64.score(exs[1], mode="rail").score, abs=1e-9)


def test_score_accepts_plain_fields(judge64, quickstart_examples):
    ex = quickstart_examples[0]
    fields = {"instruction": ex.instruction, "response": ex.response, "criteria": ex.criteria,
              "score_descriptions": ex.score_descriptions, "reference_answer": ex.reference_answer}
    assert judge64.score(fields, mode="rail").score == pytest.approx(judge64.score(ex, mode="rail").score, rel=1e-12)
    with pytest.raises(ValueError, match="criteria"):
        judge64.score({k: v for k, v in fields.items() if k != "criteria"})


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_real_smollm2_cot_rail_matches_full_logits(quickstart_examples):
    from tract_dist.data.encode import fit_prompt

    judge = Judge.from_pretrained("smollm2", max_length=600, batch_size=2,
                                  sampling=SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8,
                                                          stop=("So the overall", "[RESULT]")))
    ex = quickstart_examples[0]
    res = judge.score(ex, n_cots=2)
    prompt, truncated = fit_prompt(judge.tokenizer, ex, 600 - 8 - 32, EncodeOptions())
    assert truncated
    refs = []
    for cot in res.cots:
        tail = judge.tokenizer.encode(f"{cot} {SCORE_PHRASE} 1", add_special_tokens=False)[:-1]
        refs.append(_reference_yhat(judge, prompt + tail)[0])
    assert res.per_cot == pytest.approx(refs, rel=1e-5)
    assert res.score == pytest.approx(sum(refs) / 2, rel=1e-5)
    assert 0 < sum(res.distribution.values()) <= 1


def test_auto_count_reads_the_fixed_counts_first_cots(judge64, quickstart_examples):
    """num_cots=auto (judge/adaptive.py) on the tiny model: CoT j is the same sample whichever round draws it,
    so its first three CoTs and read-outs are those of n_cots=3; it stops within [3, max_cots]."""
    ex = quickstart_examples[4]
    fixed = judge64.score(ex, n_cots=3)
    auto = judge64.score(ex, n_cots="auto")
    assert auto.cots[:3] == fixed.cots and auto.per_cot[:3] == pytest.approx(fixed.per_cot, rel=1e-12)
    assert 3 <= len(auto.per_cot) <= judge64.max_cots
    assert auto.score == pytest.approx(sum(auto.per_cot) / len(auto.per_cot), rel=1e-12)
